"""Dictionary learners (sparse autoencoders): models, training loop, metrics and file formats."""
