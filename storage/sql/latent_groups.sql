-- latent_groups.sql: the pairs of narrow latents that fire on nearly the same documents (issue 15 part 3).
-- Run by storage/groups.py, which joins the pairs into groups (connected components) and ranks the groups.
-- Placeholders: {{latent_docs}} (latent_id, doc_id) of the scored tokens; {{latents}} (latent_id, rank).
-- Parameters: $top (only latents with rank <= $top are grouped: the list's head, where duplicates crowd),
-- $min_jaccard.
-- Two latents are linked when the Jaccard index of their document sets, |D_a & D_b| / |D_a | D_b|, is at least
-- $min_jaccard: they mark the same documents, i.e. the same behaviour seen through different tokens or a split
-- direction. Latents that never co-fire have Jaccard 0 and are never linked; exact duplicates have 1.
WITH cand AS (
    SELECT latent_id FROM {{latents}} WHERE rank IS NOT NULL AND rank <= $top
),
ld AS (
    SELECT DISTINCT ld.latent_id, ld.doc_id
    FROM {{latent_docs}} AS ld SEMI JOIN cand AS c ON c.latent_id = ld.latent_id
),
sizes AS (
    SELECT latent_id, count(*) AS n FROM ld GROUP BY latent_id
),
pairs AS (
    SELECT a.latent_id AS a, b.latent_id AS b, count(*) AS shared
    FROM ld AS a JOIN ld AS b ON a.doc_id = b.doc_id AND a.latent_id < b.latent_id
    GROUP BY a.latent_id, b.latent_id
)
SELECT p.a, p.b, p.shared / (sa.n + sb.n - p.shared)::DOUBLE AS jaccard
FROM pairs AS p
JOIN sizes AS sa ON sa.latent_id = p.a
JOIN sizes AS sb ON sb.latent_id = p.b
WHERE p.shared >= $min_jaccard * (sa.n + sb.n - p.shared)
ORDER BY p.a, p.b
