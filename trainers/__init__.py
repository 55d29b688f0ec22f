"""Ray Train TorchTrainer whose workers drive a DeepSpeed ZeRO engine; evaluation, checkpoints, export."""
