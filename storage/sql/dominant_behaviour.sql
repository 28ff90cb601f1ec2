-- dominant_behaviour.sql: per latent, the document label holding the largest share of its positive attribution
-- mass (ties: alphabetical) and that share; 'none' (ordinary documents) competes with the planted labels.
-- Inlined by storage/ranking.py into rank_latents.sql as {{dominant}}: reads the CTE `per_latent` (latent_id,
-- pos_mass) and {{behaviour_mass}} (behaviour_mass.sql). NULL for a latent without positive mass.
WITH planted AS (
    {{behaviour_mass}}
),
labels AS (
    SELECT latent_id, behaviour, pos_mass FROM planted
    UNION ALL
    SELECT p.latent_id, 'none', greatest(p.pos_mass - coalesce(sum(m.pos_mass), 0), 0)
    FROM per_latent AS p LEFT JOIN planted AS m ON m.latent_id = p.latent_id
    GROUP BY p.latent_id, p.pos_mass
)
SELECT
    l.latent_id,
    CASE WHEN p.pos_mass > 0 THEN l.behaviour END AS dominant_behaviour,
    l.pos_mass / nullif(p.pos_mass, 0) AS dominant_share
FROM labels AS l JOIN per_latent AS p ON p.latent_id = l.latent_id
QUALIFY row_number() OVER (PARTITION BY l.latent_id ORDER BY l.pos_mass DESC, l.behaviour) = 1
