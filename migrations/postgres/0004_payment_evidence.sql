-- What a payment needs to be resolved from chain state, and told apart from a replay, long
-- after its request ended.

-- SHA-256 of the paid call's canonical arguments, kept for good (unlike args_json): a payload
-- rebuilt by a stranger from public calldata gets the stored result only for the very same
-- call, never another tool or other arguments.
alter table payments add column args_hash text;

-- The chain head when the payment was checked before settlement: searches for the log that
-- spent the authorization start here, in windows a hosted RPC accepts, never from block 0.
alter table payments add column from_block bigint;

-- The relayer account nonce of our own settlement transaction: once the relayer's mined nonce
-- passes it without our transaction, that transaction can never land.
alter table payments add column tx_nonce bigint;
