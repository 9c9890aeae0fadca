"""Self-supervised pretraining (tlkd pretrain): SimCLR and its k-NN monitor."""
