-- How a paid call was priced and charged (JSON: the charge policy, refund_on_error, and the
-- price basis: a fixed amount, an expression with the hash of its inputs, or an honoured
-- offer), so the receipt of a call finished after its request died says the same as one
-- issued at once. Null on rows older than pricing policies.
alter table payments add column price_terms text;

-- The refund of a failed `refund_on_error` call (JSON, as its receipt records it). Written
-- '{"status":"sending"}' by a compare-and-set before anything is sent, so one payment is
-- refunded at most once, whoever (a retry, the finisher after a crash) runs its handler again.
alter table payments add column refund_json text;
