-- behaviour_mass.sql: each latent's positive attribution mass in the documents of each PLANTED label.
-- Inlined by storage/ranking.py into rank_latents.sql (dominant_behaviour) and recovery.sql (captures).
-- Inputs: {{latent_tokens}} and {{docs}} (doc_id, behaviour). Planted = behaviour not NULL, '' or 'none'.
-- pos_mass = sum over the latent's documents d with that label of max(S_d, 0), S_d = its attribution summed over d.
-- Only planted documents are joined (an inner join against a small table), so this costs one extra scan of three
-- columns, not a second pass over every (latent, document) pair; the 'none' mass is the latent's total positive
-- mass (rank_latents.sql: pos_mass) minus the planted masses.
SELECT latent_id, behaviour, sum(greatest(attr_sum, 0)) AS pos_mass
FROM (
    SELECT lt.latent_id, lt.doc_id, any_value(d.behaviour) AS behaviour, sum(lt.kl_attribution::DOUBLE) AS attr_sum
    FROM {{latent_tokens}} AS lt
    JOIN (SELECT doc_id, behaviour FROM {{docs}} WHERE behaviour IS NOT NULL AND behaviour NOT IN ('', 'none'))
        AS d ON d.doc_id = lt.doc_id
    GROUP BY lt.latent_id, lt.doc_id
)
GROUP BY latent_id, behaviour
