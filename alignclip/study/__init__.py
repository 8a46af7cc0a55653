"""Studies: a grid of models x seeds trained the same way, measured the same way, reported with error bars."""
