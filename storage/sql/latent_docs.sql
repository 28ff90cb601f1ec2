-- latent_docs.sql: one row per (latent, document) in which the latent fires.
-- Inlined by storage/ranking.py as the CTE `latent_docs` of rank_latents.sql and recovery.sql.
-- Input {{latent_tokens}}: doc_id, pos, latent_id, activation, kl_attribution (one row per active latent and token).
-- attr_sum is the document's attribution S_d for the latent; every document-level score derives from it.
SELECT
    latent_id,
    doc_id,
    count(*) AS n,
    sum(activation::DOUBLE) AS act_sum,
    max(activation) AS act_max,
    sum(kl_attribution::DOUBLE) AS attr_sum,
    max(kl_attribution) AS attr_max
FROM {{latent_tokens}}
GROUP BY latent_id, doc_id
