-- The arguments of a paid call, kept from its claim until its receipt is stored, so a call
-- whose request died after settlement (a crash, a dropped connection) can still be finished
-- by the server: handler run once, result stored for the client's retry, receipt issued.
-- Cleared with the receipt (or when the payment fails): a non-null value marks a call that
-- is not finished yet.
alter table payments add column args_json text;

create index payments_unfinished on payments (id) where args_json is not null;
