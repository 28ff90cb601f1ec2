-- latent_groups_attribution.sql: the pairs of narrow latents whose KL attribution goes to nearly the same
-- documents (rank.group_by: attribution). Run by storage/groups.py like latent_groups.sql, same output.
-- Placeholders: {{latent_docs}} (latent_id, doc_id, attr_sum) of the scored tokens; {{latents}} (latent_id, rank).
-- Parameters: $top, $min_jaccard.
-- Each latent's positive attribution per document, normalised over its documents, is a distribution p; two
-- latents are linked when the weighted Jaccard (Ruzicka) index of their distributions,
-- sum_d min(p_a, p_b) / sum_d max(p_a, p_b) = s / (2 - s) with s = sum_d min(p_a, p_b), is at least $min_jaccard.
-- Unlike the document-set Jaccard, a document where a latent fires but carries little of its attribution counts
-- little: a latent firing on a behaviour's documents and on many others, its KL going to the others, does not
-- join the behaviour's group. Equal document sets with uniform weights give the set Jaccard; latents that never
-- co-fire (or have no positive attribution) are never linked; exact duplicates have 1.
WITH cand AS (
    SELECT latent_id FROM {{latents}} WHERE rank IS NOT NULL AND rank <= $top
),
pos AS (
    SELECT ld.latent_id, ld.doc_id, sum(ld.attr_sum) AS a
    FROM {{latent_docs}} AS ld SEMI JOIN cand AS c ON c.latent_id = ld.latent_id
    GROUP BY ld.latent_id, ld.doc_id
    HAVING sum(ld.attr_sum) > 0
),
p AS (
    SELECT latent_id, doc_id, a / sum(a) OVER (PARTITION BY latent_id) AS p FROM pos
),
pairs AS (
    SELECT a.latent_id AS a, b.latent_id AS b, sum(least(a.p, b.p)) AS s
    FROM p AS a JOIN p AS b ON a.doc_id = b.doc_id AND a.latent_id < b.latent_id
    GROUP BY a.latent_id, b.latent_id
)
SELECT a, b, s / (2 - s) AS jaccard
FROM pairs
WHERE s >= $min_jaccard * (2 - s)
ORDER BY a, b
