"""The update store survives a crash mid-write and a resumed run appends after it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fed_ser.recording.store import UpdateStore


def _update(i):
    return {"dense1.weight": np.full((4, 3), i, np.float32), "dense1.bias": np.arange(4, dtype=np.float32) + i}


def test_truncated_store_reads_back_up_to_last_complete_update_and_resumes(tmp_path):
    store = UpdateStore(tmp_path, mode="a")
    for i in range(5):
        store.append(_update(i), round=i + 1, node=10 + i, num_examples=20)
    size = store.data_path.stat().st_size
    store.close()
    with open(store.data_path, "r+b") as fh:  # kill mid-write of the 5th update
        fh.truncate(size - 7)
    reopened = UpdateStore(tmp_path, mode="a")  # the resumed run's writer repairs the torn tail
    assert len(reopened) == 4 and reopened.recovered_bytes > 0
    for i, info in enumerate(reopened.updates()):
        np.testing.assert_array_equal(reopened.read(info)["dense1.weight"], _update(i)["dense1.weight"])
    assert len(reopened.index_path.read_text().splitlines()) == 4
    reopened.append(_update(9), round=5, node=99, num_examples=20)
    reopened.close()
    again = UpdateStore(tmp_path)
    assert [r.node for r in again.updates()] == [10, 11, 12, 13, 99]
    np.testing.assert_array_equal(again.read(again.updates()[-1])["dense1.bias"], _update(9)["dense1.bias"])


def test_corrupt_payload_is_cut_and_float16_halves_bytes(tmp_path):
    s32 = UpdateStore(tmp_path / "a", mode="a")
    s16 = UpdateStore(tmp_path / "b", mode="a")
    big = {"w": np.random.default_rng(0).normal(size=(256, 988)).astype(np.float32)}
    s32.append(big, round=1, node=1)
    s16.append(big, round=1, node=1, float16=True)
    assert s16.bytes_per_update() / s32.bytes_per_update() < 0.51
    np.testing.assert_allclose(s16.read(s16.updates()[0])["w"], big["w"], atol=2e-3)
    s32.append(big, round=2, node=1)
    s32.close()
    data = bytearray(s32.data_path.read_bytes())
    data[-10] ^= 0xFF  # flip a byte of the last payload
    s32.data_path.write_bytes(bytes(data))
    assert len(UpdateStore(tmp_path / "a")) == 1


def test_truncate_after_round_for_resume(tmp_path):
    store = UpdateStore(tmp_path, mode="a")
    for r in (1, 1, 2, 2, 3):
        store.append(_update(r), round=r, node=r)
    assert store.truncate_after_round(2) == 1
    assert [r.round for r in UpdateStore(tmp_path).updates()] == [1, 1, 2, 2]


def test_a_reader_never_modifies_the_store_and_only_one_writer_records(tmp_path):
    """An attack opened while a run is recording must not cut the writer's half-written record."""
    writer = UpdateStore(tmp_path, mode="a")
    for i in range(3):
        writer.append(_update(i), round=i + 1, node=i, num_examples=20)
    with open(writer.data_path, "ab") as fh:  # the writer is in the middle of its next record
        fh.write(b"FSU1" + b"\x00" * 9)
    size, index = writer.data_path.stat().st_size, writer.index_path.read_text()
    reader = UpdateStore(tmp_path)
    assert len(reader) == 3 and reader.recovered_bytes == 0
    np.testing.assert_array_equal(reader.read(reader.updates()[-1])["dense1.bias"], _update(2)["dense1.bias"])
    assert writer.data_path.stat().st_size == size and writer.index_path.read_text() == index  # untouched
    with pytest.raises(RuntimeError, match="another process is recording"):
        UpdateStore(tmp_path, mode="a")
    with pytest.raises(PermissionError, match="read-only"):
        reader.append(_update(9), round=9, node=9)
    writer.close()
    repaired = UpdateStore(tmp_path, mode="a")  # the next writer repairs what the last one left
    assert repaired.recovered_bytes == 13 and repaired.data_path.stat().st_size == size - 13
    repaired.close()
    with pytest.raises(FileNotFoundError, match="no recorded updates"):
        UpdateStore(tmp_path / "nothing")


def test_a_round_committed_once_reads_back_whole_and_an_uncommitted_round_is_redone(tmp_path):
    """Group commit: appends with sync=False reach the index at the round's sync; a writer that died
    before it leaves frames the next writer indexes (or cuts, when torn) and truncate_after_round drops."""
    store = UpdateStore(tmp_path, mode="a")
    arrays = [dict(_update(i), big=np.random.default_rng(i).normal(size=(64, 50)).astype(np.float32)) for i in range(6)]
    for i in range(3):
        store.append(arrays[i], round=1, node=i, sync=False)
    assert not store.index_path.read_text()  # nothing committed yet
    store.sync()
    assert len(store.index_path.read_text().splitlines()) == 3
    for i in range(3, 6):  # round 2, never committed: the writer dies without closing
        store.append(arrays[i], round=2, node=i, sync=False)
    for fd in (store._wfd, store._lock):  # a killed process: its descriptors close, nothing is committed
        os.close(fd)
    store._wfd, store._pending, store._lock = None, [], None
    resumed = UpdateStore(tmp_path, mode="a")
    assert [(r.round, r.node) for r in resumed.updates()] == [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]
    assert len(resumed.index_path.read_text().splitlines()) == 6  # the index follows the complete frames
    assert resumed.truncate_after_round(1) == 3  # the checkpoint says round 1: round 2 is redone
    resumed.append(arrays[5], round=2, node=7, sync=False)
    resumed.close()
    again = UpdateStore(tmp_path)
    assert [(r.round, r.node) for r in again.updates()] == [(1, 0), (1, 1), (1, 2), (2, 7)]
    for info, want in zip(again.updates(), [arrays[0], arrays[1], arrays[2], arrays[5]]):
        got = again.read(info)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_stores_written_with_zlib_crc32_stay_readable(tmp_path):
    """Stores recorded before the CRC32C frames (magic FSU1, zlib's CRC32, the client id called partition)
    read back and take appends."""
    import json
    import struct
    import zlib

    tmp_path.mkdir(exist_ok=True)
    arrays = _update(3)
    meta = dict(round=1, node=9, partition=5, num_examples=20, steps=1, lr=0.1, kind="gradient", dtype="float32",
                layers={k: list(v.shape) for k, v in arrays.items()})
    header = json.dumps(meta).encode()
    payload = b"".join(v.tobytes() for v in arrays.values())
    frame = struct.pack("<4sIQI", b"FSU1", len(header), len(payload), zlib.crc32(payload, zlib.crc32(header)))
    (tmp_path / "updates.bin").write_bytes(frame + header + payload)
    (tmp_path / "index.jsonl").write_text(json.dumps({**meta, "offset": struct.calcsize("<4sIQI") + len(header)}) + "\n")
    old = UpdateStore(tmp_path)
    assert [(r.node, r.client) for r in old.updates()] == [(9, 5)]
    np.testing.assert_array_equal(old.read(old.updates()[0])["dense1.bias"], arrays["dense1.bias"])
    old.close()
    writer = UpdateStore(tmp_path, mode="a")  # a resumed old run appends new frames after the old ones
    writer.append(_update(4), round=2, node=6)
    writer.close()
    assert [r.node for r in UpdateStore(tmp_path).updates()] == [9, 6]
    assert '"partition"' not in (tmp_path / "index.jsonl").read_text()  # the writer rewrote the old index's names


def _six(path):
    store = UpdateStore(path, mode="a")
    infos = [store.append(_update(i), round=i + 1, node=i, num_examples=20) for i in range(6)]
    store.close()
    return infos


def test_a_flipped_byte_in_the_first_of_six_records_loses_that_record_only_and_says_where(tmp_path, capsys):
    infos = _six(tmp_path)
    data = bytearray((tmp_path / "updates.bin").read_bytes())
    data[infos[0].offset + 5] ^= 0x01  # one bit of record 1's payload
    (tmp_path / "updates.bin").write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"1 corrupt region\(s\) skipped \(\d+ bytes at offset 0\)"):
        reader = UpdateStore(tmp_path)
    assert [r.node for r in reader.updates()] == [1, 2, 3, 4, 5] and reader.corrupt == [(0, infos[1].start)]
    with pytest.warns(RuntimeWarning, match="the 5 valid records are kept"):
        writer = UpdateStore(tmp_path, mode="a")  # the writer keeps records 2-6: it truncates nothing there
    assert (tmp_path / "updates.bin").stat().st_size == len(data) and writer.recovered_bytes == 0
    writer.append(_update(9), round=7, node=9)
    writer.close()
    with pytest.warns(RuntimeWarning):
        again = UpdateStore(tmp_path)
    assert [r.node for r in again.updates()] == [1, 2, 3, 4, 5, 9]
    for i, info in zip([1, 2, 3, 4, 5, 9], again.updates()):
        np.testing.assert_array_equal(again.read(info)["dense1.weight"], _update(i)["dense1.weight"])
    assert "dropped" not in capsys.readouterr().err


def test_a_damaged_length_field_mid_store_is_skipped_not_taken_for_a_torn_tail(tmp_path):
    infos = _six(tmp_path)
    data = bytearray((tmp_path / "updates.bin").read_bytes())
    data[infos[2].start + 8: infos[2].start + 16] = (10**12).to_bytes(8, "little")  # record 3's payload length: past the end
    (tmp_path / "updates.bin").write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=f"at offset {infos[2].start}"):
        writer = UpdateStore(tmp_path, mode="a")
    assert [r.node for r in writer.updates()] == [0, 1, 3, 4, 5] and writer.recovered_bytes == 0
    writer.close()


def test_only_a_torn_final_frame_is_dropped_and_the_writer_says_so(tmp_path, capsys):
    infos = _six(tmp_path)
    size = (tmp_path / "updates.bin").stat().st_size
    with open(tmp_path / "updates.bin", "r+b") as fh:
        fh.truncate(size - 3)
    writer = UpdateStore(tmp_path, mode="a")
    assert len(writer) == 5 and writer.recovered_bytes == size - 3 - infos[5].start and not writer.corrupt
    assert f"dropped a torn final frame ({writer.recovered_bytes} bytes at offset {infos[5].start})" in capsys.readouterr().err
    writer.close()


def test_read_verifies_the_checksum_of_what_it_returns(tmp_path):
    from fed_ser.recording.store import CorruptRecord

    infos = _six(tmp_path)
    reader = UpdateStore(tmp_path)  # opened while the file is intact
    with open(tmp_path / "updates.bin", "r+b") as fh:  # then a byte of record 4 changes on disk
        fh.seek(infos[3].offset + 2)
        byte = fh.read(1)
        fh.seek(infos[3].offset + 2)
        fh.write(bytes([byte[0] ^ 0x10]))
    np.testing.assert_array_equal(reader.read(reader.updates()[2])["dense1.bias"], _update(2)["dense1.bias"])
    with pytest.raises(CorruptRecord, match=f"offset {infos[3].start}"):
        reader.read(reader.updates()[3], layers=["dense1.bias"])


def _run(tmp_path, rounds: list[int], checkpoint: int | None, **kw):
    """A run folder whose store holds records of ``rounds``, with a checkpoint after round ``checkpoint``."""
    from fed_ser.recording.checkpoint import save_checkpoint
    from fed_ser.run.settings import RunSettings

    s = RunSettings(prepared="x.npz", out_dir=str(tmp_path), recorder_dir=str(tmp_path / "updates"), **kw)
    store = UpdateStore(s.recorder_dir, mode="a")
    for r in rounds:
        store.append(_update(r), round=r, node=r, sync=False)
    store.close()
    if checkpoint is not None:
        save_checkpoint(tmp_path / "checkpoint.npz", checkpoint, s, {})
    return s


def test_a_rerun_refuses_to_drop_the_records_of_finished_rounds_and_says_which(tmp_path):
    from dataclasses import replace

    from fed_ser.recording.overwrite import check_overwrite
    from fed_ser.run.settings import ConfigError

    s = _run(tmp_path, [1, 1, 2, 2, 3, 3], checkpoint=3, resume=False)  # a finished run, rerun from scratch (fed-ser-deploy)
    with pytest.raises(ConfigError, match=r"^recorder\.overwrite: .* holds 6 recorded records of finished rounds 1-3 that this "
                                          r"run would drop \(resume=false\); set recorder\.overwrite=true"):
        check_overwrite(s)
    assert len(UpdateStore(s.recorder_dir)) == 6  # nothing dropped
    check_overwrite(replace(s, recorder_overwrite=True))  # told to


@pytest.mark.parametrize("rounds,checkpoint,resume,refused", [
    ([1, 1, 2, 2, 3], 2, True, False),  # resumed after round 2: round 3 never finished, a resume redoes it
    ([1, 1], None, True, False),  # died in round 1: nothing finished
    ([1, 1, 2], None, False, True),  # round 1 finished (round 2 began), no checkpoint: data
    ([1, 1, 2, 2], 2, True, False),  # resumed after its last round: drops nothing
])
def test_only_unfinished_rounds_are_dropped_without_asking(tmp_path, rounds, checkpoint, resume, refused):
    from fed_ser.recording.overwrite import check_overwrite
    from fed_ser.run.settings import ConfigError

    s = _run(tmp_path, rounds, checkpoint, resume=resume)
    if refused:
        with pytest.raises(ConfigError, match="recorder.overwrite"):
            check_overwrite(s)
    else:
        check_overwrite(s)


def test_fed_ser_deploy_over_a_recorded_run_refuses_before_anything_starts(tmp_path, capsys, monkeypatch):
    """fed-ser-deploy reruns from scratch (resume=false): over an earlier deployment's records it stops at once."""
    from fed_ser.experiments.deploy import main

    _run(tmp_path / "deployment", [1, 1, 2, 2], checkpoint=2, resume=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([f"out_dir={tmp_path}", f"deploy.workdir={tmp_path / 'fed'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "holds 4 recorded records of finished rounds 1-2" in err
    assert not (tmp_path / "fed").exists() and len(UpdateStore(tmp_path / "deployment" / "updates")) == 4
