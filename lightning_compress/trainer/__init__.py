"""What the callbacks share about a running Trainer: progress in optimizer steps, logger-agnostic tables, and the
checkpoint selection that waits for every compression target (:class:`CompressionTarget`)."""
