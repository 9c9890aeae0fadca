"""Self-supervised pretraining (tlkd pretrain): SimCLR, BYOL, SimSiam and the k-NN monitor."""
