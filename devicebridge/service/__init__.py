"""``devicebridge serve``: the long-running bridge. The supervisor (``supervisor``) keeps a
worker per device (``worker``), publishes through the outbox (``publishing``, ``telemetry``),
takes therapists' programs (``inbox``) and local routine starts (``local_api``), and keeps
the status file (``status``)."""
