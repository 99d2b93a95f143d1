"""Training: networks, losses, the training loop with its checkpoints, sliding-window inference and the
completion of unlabelled channels. Imports only `fedseg.data` and the bottom layer.
"""
