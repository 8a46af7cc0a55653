"""Analysis of embedding spaces: gap metrics, plots and reports."""
