"""The ground floor every zeray package stands on, importing none of them: the user-error type, filesystem
helpers for local paths and object stores, dotted config keys, and the typed config section with its one-line
validation errors."""
