"""Environment tools: the optional s3prl environment builder."""
