"""Utterance features: openSMILE Emo-Base and s3prl upstreams, cached by content, z-normalised per speaker."""
