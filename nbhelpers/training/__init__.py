"""Training: configuration (``config``), checkpoints and the run-folder lock (``checkpoint``),
the run record (``provenance``), the loop (``loop``), one run over several processes under
torchrun (``distributed``), whole runs (``runs``), losses, and the command line of one run
(``command``)."""
