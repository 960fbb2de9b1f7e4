-- The claim table: one row per EIP-3009 authorization we have ever accepted for settlement.
create table payments (
    -- surrogate key used by results and receipts
    id integer primary key autoincrement,
    -- CAIP-2 network, token contract, recovered payer and EIP-3009 nonce: the claim key.
    -- UNIQUE makes the claim atomic across every replica sharing this database.
    network text not null,
    asset text not null,
    payer text not null,
    nonce text not null,
    -- SHA-256 of the canonical payment payload, to tell a replay of the same payment
    -- (served the stored result) from a different payload reusing the nonce (refused)
    payload_hash text not null,
    -- optional x402 payment-identifier extension id, for idempotent retries
    payment_id text,
    -- tool that was paid for, and the price it was paid at (atomic units, decimal text)
    tool text not null,
    amount text not null,
    -- claimed | settling | pending | settled | failed
    state text not null check (state in ('claimed', 'settling', 'pending', 'settled', 'failed')),
    -- settlement transaction and its block, once known
    tx_hash text,
    block_number bigint,
    -- why a payment failed (reason code), for the client and the receipt
    error text,
    -- when a request started the handler for this settled payment: a lease, so the handler
    -- runs at most once, yet a crashed run can be taken over after it expires
    handler_started_at bigint,
    -- authorization expiry: after it, an unsettled authorization can never settle
    valid_before bigint not null,
    -- the full payment payload, needed to resume settlement after a crash or timeout
    payload_json text not null,
    created_at bigint not null,
    updated_at bigint not null,
    unique (network, asset, payer, nonce)
);

create unique index payments_payment_id on payments (payment_id) where payment_id is not null;
create index payments_unresolved on payments (state) where state in ('claimed', 'settling', 'pending');

-- The result of a settled call, so a replay of the same payment gets it without a second run.
create table results (
    payment_row bigint primary key references payments (id),
    -- the MCP CallToolResult as JSON, exactly as first served
    result_json text not null,
    created_at bigint not null
);
