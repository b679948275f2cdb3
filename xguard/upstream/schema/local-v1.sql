-- xguard local store, schema version 1 (PRAGMA user_version = 1).
-- A fresh database is created from the newest local-vN.sql; an older one is
-- brought forward by local-upgrade-to-vN.sql scripts, in order.

CREATE TABLE vm (
    uuid TEXT PRIMARY KEY NOT NULL,
    -- The NVRAM map as a JSON object of string to string ({} = first boot).
    nvram TEXT NOT NULL DEFAULT '{}',
    -- The update flag of the last EFI-variables write: yes, no, unspecified.
    nvram_update TEXT NOT NULL DEFAULT 'unspecified',
    -- ok, update_available or update_on_boot.
    secureboot_state TEXT NOT NULL DEFAULT 'ok'
);

CREATE TABLE vtpm (
    uuid TEXT PRIMARY KEY NOT NULL,
    vm_uuid TEXT NOT NULL REFERENCES vm(uuid),
    -- xapi's single string: "permall savestate volatilestate".
    contents TEXT NOT NULL DEFAULT ''
);
CREATE INDEX vtpm_by_vm ON vtpm(vm_uuid);

CREATE TABLE message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ref TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    priority INTEGER NOT NULL,
    class TEXT NOT NULL,
    obj_uuid TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX message_by_obj ON message(obj_uuid);
