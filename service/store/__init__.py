"""The system of record: owners, hashed tokens, jobs and their status history.

SQLite (WAL mode, one writer at a time) by default, PostgreSQL by URL, through SQLAlchemy Core:
- `schema`: the tables and their numbered migrations (recorded in `schema_migrations`);
- `engine`: engines, SQLite's tuning and its WAL checkpointer;
- `rows`: the rows the store hands out and takes in, and its errors;
- `access`: `Store`, the data access (every status change a compare-and-set with its event).
The job statuses and their state machine are in service/job_status.py.
"""

from service.store.access import Store
from service.store.rows import IdempotencyConflict, IllegalTransition, JobRow, NewJob, hash_token

__all__ = ["IdempotencyConflict", "IllegalTransition", "JobRow", "NewJob", "Store", "hash_token"]
