-- recovery_v2.sql: recovery judged on documents held out of SAE training, with precision AND coverage, for every
-- score and for two baseline orders (issue 15 parts 1-2). Run by storage/recovery.py recovery().
-- Placeholders: {{captures}} captures_v2.sql (latent_id, behaviour: who captures which planted label on held-out
-- documents, with precision and coverage); {{docs}} (doc_id, behaviour); {{heldout}} (doc_id) the documents the
-- SAE never trained on; {{orders}} orders_v2.sql (latent_id, score, rnk: every score, the frequency and
-- firing_kl baselines over the narrow latents, and the groups).
-- Parameters: $precision, $coverage (of captures_v2.sql), $top_k (10).
-- Per (order, behaviour): best_rank (NULL: nothing captures b), recovered (best_rank <= $top_k), n_capturing
-- (narrow latents that capture b: the random-order baseline's input), n_heldout (b's documents in H).
WITH planted AS (
    SELECT d.behaviour, count(*) AS n_heldout
    FROM {{docs}} AS d SEMI JOIN {{heldout}} AS h ON h.doc_id = d.doc_id
    WHERE d.behaviour IS NOT NULL AND d.behaviour NOT IN ('', 'none')
    GROUP BY d.behaviour
),
captures AS (
    {{captures}}
),
orders AS (
    {{orders}}
),
best AS (
    SELECT o.score, c.behaviour, min(o.rnk) AS best_rank
    FROM orders AS o JOIN captures AS c ON c.latent_id = o.latent_id
    GROUP BY ALL
),
counts AS (
    SELECT c.behaviour, count(*) AS n_capturing
    FROM captures AS c SEMI JOIN (SELECT latent_id FROM orders WHERE score = 'frequency') AS n
        ON n.latent_id = c.latent_id
    GROUP BY c.behaviour
)
SELECT
    s.score,
    p.behaviour,
    b.best_rank,
    coalesce(b.best_rank <= $top_k, false) AS recovered,
    coalesce(c.n_capturing, 0) AS n_capturing,
    p.n_heldout
FROM (SELECT DISTINCT score FROM orders) AS s
CROSS JOIN planted AS p
LEFT JOIN best AS b ON b.score = s.score AND b.behaviour = p.behaviour
LEFT JOIN counts AS c ON c.behaviour = p.behaviour
