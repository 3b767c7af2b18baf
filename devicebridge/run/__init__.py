"""Running a routine on a device: the one runner every routine runs through (``runner``),
what a live view shows of it (``view``), what it leaves (``summary``), what admission reads
of the store (``history``) and what a stopped process left behind (``recovery``)."""
