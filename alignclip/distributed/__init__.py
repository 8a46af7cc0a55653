"""Cross-rank helpers: the one feature gather (``gather``) and rank set-up (``env``)."""
