"""The torch-free layer both sides share: the model catalogue, the run-folder contract, secret
references and the error tree. It imports neither `launcher` nor `jobs` (a test enforces it)."""
