-- latent_docs.sql: S_d, a latent's attribution summed over one document, per (latent, document) where it fires.
-- Inlined by storage/ranking.py as the CTE `latent_docs` of rank_latents.sql. Input {{latent_tokens}}: doc_id, pos,
-- latent_id, activation, kl_attribution (one row per active latent and token). Every document-level score derives
-- from attr_sum; the payload is kept to that one sum because this aggregation, over ~one group per input row on
-- dense data, dominates the ranking's cost (bench/rank.py).
SELECT latent_id, doc_id, sum(kl_attribution::DOUBLE) AS attr_sum
FROM {{latent_tokens}}
GROUP BY latent_id, doc_id
