"""Results: the one layout of a results folder (``layout``) and the SQLite store (``store``)."""
