-- The service's state: files, fine-tuning jobs, their events and checkpoints, fine-tuned models.
-- One file, in versions: the store applies every `-- version N` section above the database's own
-- version, in order, each in one transaction, so a database made by an older feathertune migrates
-- forward on start. Never edit a released section; add a new one below.
-- Portable SQL: the same text runs on SQLite and PostgreSQL. Times are Unix seconds (OpenAI's
-- `created_at`); `created_ns` orders rows and pages through them. JSON values are TEXT.

-- version 1
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    created_ns BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    filename TEXT NOT NULL,       -- the name the client gave, for display only: never a path
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    stored_name TEXT NOT NULL     -- the server's name for it under <data dir>/files/
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    created_ns BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed BIGINT NOT NULL,
    metadata TEXT,                -- JSON object or NULL
    method TEXT NOT NULL,         -- JSON: OpenAI's method object, hyperparameters resolved
    options TEXT NOT NULL,        -- JSON: feathertune's own choices (method, adapter, train, ...)
    status TEXT NOT NULL,         -- validating_files, queued, running, paused, succeeded, failed, cancelled
    requested TEXT,               -- cancel or pause, asked of a running job; the worker acts on it
    error TEXT,                   -- JSON {code, message, param} or NULL
    fine_tuned_model TEXT,
    finished_at BIGINT,
    trained_tokens BIGINT,
    estimated_finish BIGINT,
    result_files TEXT NOT NULL,   -- JSON list of file ids
    worker TEXT,                  -- host:pid:token of the worker running it
    heartbeat_at DOUBLE PRECISION -- when that worker last said it is alive
);
CREATE INDEX jobs_by_status ON jobs (status, created_ns);

CREATE TABLE events (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    created_ns BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    level TEXT NOT NULL,          -- info, warn, error
    message TEXT NOT NULL,
    type TEXT NOT NULL,           -- message or metrics
    data TEXT                     -- JSON (metrics: step, train_loss, valid_loss, ...)
);
CREATE INDEX events_by_job ON events (job_id, created_ns);

CREATE TABLE checkpoints (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    created_ns BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    step_number BIGINT NOT NULL,
    metrics TEXT NOT NULL,        -- JSON
    fine_tuned_model_checkpoint TEXT NOT NULL
);
CREATE INDEX checkpoints_by_job ON checkpoints (job_id, created_ns);

CREATE TABLE models (
    id TEXT PRIMARY KEY,          -- ft:<base>:<suffix>:<job id>[:ckpt-step-N]
    created_ns BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    base TEXT NOT NULL,
    job_id TEXT NOT NULL,
    adapter TEXT NOT NULL         -- the adapter directory, relative to the data directory
);
