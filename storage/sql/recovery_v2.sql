-- recovery_v2.sql: recovery judged on documents held out of SAE training, with precision AND coverage, for every
-- score and for two baseline orders (issue 15 parts 1-2). Run by storage/ranking.py recovery().
-- Placeholders: {{latent_docs}} (latent_id, doc_id, attr_sum) of the scored tokens; {{docs}} (doc_id, behaviour);
-- {{heldout}} (doc_id) the documents the SAE never trained on; {{latents}} (latent_id, n_active, rank and one
-- rank_<score> per score: no other rank_ column); {{firing_kl}} (latent_id, firing_kl) the mean per-token KL(ft||base) at the
-- scored tokens where the latent fires.
-- Parameters: $precision (0.8), $coverage (0.5), $top_k (10).
-- On the held-out documents H, with s_d = max(S_d, 0) (S_d = the latent's attribution summed over document d), a
-- latent CAPTURES planted behaviour b when
--   precision: sum of s_d over b's documents in H >= $precision x sum of s_d over H, and
--   coverage:  it fires (on scored tokens) in >= $coverage x (b's documents in H).
-- A latent with precision 1.0 that fires in 1 of 40 documents of b does not capture b.
-- Orders: every score (rank_<score>: narrow latents only), `frequency` (firing tokens, most first) and
-- `firing_kl` (mean per-token KL at its firing tokens, highest first), both over the narrow latents too.
-- Per (order, behaviour): best_rank (NULL: nothing captures b), recovered (best_rank <= $top_k), n_capturing
-- (narrow latents that capture b: the random-order baseline's input), n_heldout (b's documents in H).
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
),
captures AS (
    SELECT p.latent_id, p.behaviour
    FROM per_b AS p
    JOIN total AS t ON t.latent_id = p.latent_id
    JOIN planted AS n ON n.behaviour = p.behaviour
    WHERE t.s_all > 0 AND p.s_b >= $precision * t.s_all AND p.docs_b >= $coverage * n.n_heldout
),
narrow AS (
    SELECT l.latent_id, l.n_active, f.firing_kl
    FROM {{latents}} AS l LEFT JOIN {{firing_kl}} AS f ON f.latent_id = l.latent_id
    WHERE l.rank IS NOT NULL
),
orders AS (
    SELECT latent_id, substr(score_col, 6) AS score, rnk
    FROM (UNPIVOT (SELECT latent_id, COLUMNS('^rank_') FROM {{latents}})
          ON COLUMNS('^rank_') INTO NAME score_col VALUE rnk)
    UNION ALL
    SELECT latent_id, 'frequency', row_number() OVER (ORDER BY n_active DESC, latent_id) FROM narrow
    UNION ALL
    SELECT latent_id, 'firing_kl', row_number() OVER (ORDER BY firing_kl DESC NULLS LAST, latent_id) FROM narrow
),
best AS (
    SELECT o.score, c.behaviour, min(o.rnk) AS best_rank
    FROM orders AS o JOIN captures AS c ON c.latent_id = o.latent_id
    GROUP BY ALL
),
counts AS (
    SELECT c.behaviour, count(*) AS n_capturing
    FROM captures AS c SEMI JOIN narrow AS n ON n.latent_id = c.latent_id
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
