-- One build per event: a server that dies after creating an event's build but before
-- marking the event processed handles the event again on restart; the second build is
-- refused here instead of superseding the first. Builds without an event (rebuilds)
-- have NULL, which is never equal to anything.
CREATE UNIQUE INDEX builds_one_per_event ON builds (event_id);
