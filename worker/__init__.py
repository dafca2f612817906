"""The worker daemon and the training it runs in a child process."""
