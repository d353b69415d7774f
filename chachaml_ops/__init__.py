"""chachaml-ops: integrity checks, orphan reports and consistent backups for chachaml stores."""

__version__ = "0.1.0"
