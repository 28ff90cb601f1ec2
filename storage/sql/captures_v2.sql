-- captures_v2.sql: which latents capture which label, judged on held-out documents (recovery v2, issue 15).
-- Inlined by storage/recovery.py into recovery_v2.sql and false_alarms.sql.
-- Placeholders: {{latent_docs}} (latent_id, doc_id, attr_sum) of the scored tokens; {{docs}} (doc_id, behaviour:
-- the labels, real or placebo); {{heldout}} (doc_id) the documents the SAE never trained on.
-- Parameters: $precision (0.8), $coverage (0.5).
-- On the held-out documents H, with s_d = max(S_d, 0) (S_d = the latent's attribution summed over document d), a
-- latent CAPTURES label b (not NULL, '' or 'none') when
--   precision: sum of s_d over b's documents in H >= $precision x sum of s_d over H, and
--   coverage:  it fires (on scored tokens) in >= $coverage x (b's documents in H).
-- A latent with precision 1.0 that fires in 1 of 40 documents of b does not capture b. Output: (latent_id, behaviour).
WITH held AS (
    SELECT d.doc_id, d.behaviour
    FROM {{docs}} AS d SEMI JOIN {{heldout}} AS h ON h.doc_id = d.doc_id
),
planted AS (
    SELECT behaviour, count(*) AS n_heldout
    FROM held WHERE behaviour IS NOT NULL AND behaviour NOT IN ('', 'none')
    GROUP BY behaviour
),
mass AS (
    SELECT ld.latent_id, h.behaviour, greatest(ld.attr_sum, 0) AS s
    FROM {{latent_docs}} AS ld JOIN held AS h ON h.doc_id = ld.doc_id
),
total AS (
    SELECT latent_id, sum(s) AS s_all FROM mass GROUP BY latent_id
),
per_b AS (
    SELECT latent_id, behaviour, sum(s) AS s_b, count(*) AS docs_b
    FROM mass JOIN planted USING (behaviour)
    GROUP BY latent_id, behaviour
)
SELECT p.latent_id, p.behaviour
FROM per_b AS p
JOIN total AS t ON t.latent_id = p.latent_id
JOIN planted AS n ON n.behaviour = p.behaviour
WHERE t.s_all > 0 AND p.s_b >= $precision * t.s_all AND p.docs_b >= $coverage * n.n_heldout
