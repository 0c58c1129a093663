"""What the eavesdropper keeps: the append-only update store, the recorder that turns client
replies into (pseudo-)gradients, and model checkpoints with their history."""
