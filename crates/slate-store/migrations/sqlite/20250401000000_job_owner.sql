-- Who holds a provisioning or running job: the owner its claim named (`local` for a
-- lease-less claim), cleared when the job leaves those states. One server uses a SQLite
-- file, so no lease is kept and none ever runs out; the owner is recorded so that a
-- runner's owner-checked transitions mean the same as with PostgreSQL.
ALTER TABLE jobs ADD COLUMN owner TEXT;
