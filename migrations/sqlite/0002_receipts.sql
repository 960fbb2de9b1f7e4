-- Signed receipts: one per settled payment, each a leaf of the transparency log.
create table receipts (
    -- position in the transparency log: dense, 0-based, assigned under a lock
    log_index bigint primary key,
    -- the payment this receipt is for; at most one receipt per payment
    payment_row bigint not null unique references payments (id),
    -- lower-case payer address, and this receipt's place in that payer's chain (1, 2, 3…)
    payer text not null,
    payer_seq bigint not null,
    -- RFC 8785 canonical JSON of the receipt body, exactly as signed
    body text not null,
    -- detached ed25519 signature over `body`, hex, and the id of the key that made it
    signature text not null,
    kid text not null,
    -- RFC 6962 leaf hash of `body`, hex: the log is built from these
    leaf_hash text not null,
    created_at bigint not null,
    unique (payer, payer_seq)
);

-- Signed tree heads of the log.
create table log_checkpoints (
    -- number of leaves covered, and their Merkle root (hex)
    tree_size bigint primary key,
    root_hash text not null,
    -- canonical JSON of the checkpoint body, its ed25519 signature (hex) and key id
    body text not null,
    signature text not null,
    kid text not null,
    created_at bigint not null
);
