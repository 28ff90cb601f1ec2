-- latent_docs.sql: the `latent_docs` table rebuilt from `latent_tokens`: per (latent, document) where the latent
-- fires, n_tokens, act_sum, act_max, attr_sum (S_d, the latent's attribution summed over the document), attr_max.
-- The attribution stage writes this table itself (diffsae.attribution.latent_doc_stats, per batch of whole
-- documents, nearly free there); storage/ranking.py inlines this query only for runs that lack it. It is a hash
-- aggregation with ~one group per input row on dense data: ~10x a bare scan of latent_tokens (bench/rank.py).
-- Placeholders: {{latent_tokens}} (doc_id, pos, latent_id, activation, kl_attribution); {{where}} a filter on the
-- token rows (`true` for all).
SELECT
    latent_id,
    doc_id,
    count(*)::INTEGER AS n_tokens,
    sum(activation::DOUBLE) AS act_sum,
    max(activation) AS act_max,
    sum(kl_attribution::DOUBLE) AS attr_sum,
    max(kl_attribution) AS attr_max
FROM {{latent_tokens}}
WHERE {{where}}
GROUP BY latent_id, doc_id
