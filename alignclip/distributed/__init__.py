"""Cross-rank helpers: rank set-up (``env``), process plumbing (``process``: signals, worker shielding,
rank / world / barrier / any-rank), the batch split over ranks (``layout``) and the one feature gather
(``gather``)."""
