use super::*;

fn k(layer: u32, expert: u32) -> ExpertKey {
    ExpertKey::new(layer, expert)
}

fn pool(n_slots: usize) -> SlotPolicy {
    SlotPolicy::new(PolicyConfig::new(n_slots, 4, 64)).unwrap()
}

/// Checks `plan` against the needed `keys`, the policy's state and the pool's invariants.
fn check(p: &SlotPolicy, plan: &RequestPlan, keys: &[ExpertKey]) {
    let mut want = keys.to_vec();
    want.sort();
    want.dedup();
    let mut got: Vec<ExpertKey> = plan.entries().map(|(k, _)| k).collect();
    got.sort();
    assert_eq!(got, want, "every needed key in exactly one wave");
    for w in &plan.waves {
        assert!(!w.is_empty() && w.len() <= p.n_slots());
        let mut slots: Vec<SlotId> = w.entries().map(|(_, s)| s).collect();
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), w.len(), "distinct slots within a wave");
    }
    for (key, slot) in plan.waves.last().into_iter().flat_map(Wave::entries) {
        assert_eq!((p.lookup(key), p.key_in(slot)), (Some(slot), Some(key)));
    }
    // Every slot is exactly one of: free, evictable (in its layer and class set), locked.
    let mut n_evictable = 0;
    for s in 0..p.n_slots() as SlotId {
        let slot = &p.slots[s as usize];
        assert!(!slot.pinned);
        let in_free = p.free.contains(&s);
        let in_set = p
            .position(s)
            .is_some_and(|(l, c, e)| p.evictable[l][c].contains(&e));
        match (slot.key, slot.locked) {
            (_, true) => assert!(!in_free && !in_set),
            (None, false) => assert!(in_free && !in_set),
            (Some(key), false) => {
                assert!(!in_free && in_set);
                assert_eq!(p.lookup(key), Some(s));
                n_evictable += 1;
            }
        }
    }
    let mut touched = p.touched.clone();
    touched.sort();
    touched.dedup();
    assert_eq!(touched.len(), p.touched.len(), "each slot listed once");
    let in_sets: usize = p.evictable.iter().flatten().map(BTreeSet::len).sum();
    assert_eq!(in_sets, n_evictable);
}

/// Requests `keys`, checks the plan, starts the next step.
fn step(p: &mut SlotPolicy, keys: &[ExpertKey]) -> RequestPlan {
    let plan = p.request(keys).unwrap();
    check(p, &plan, keys);
    p.begin_step();
    plan
}

#[test]
fn hits_and_misses_are_counted() {
    let mut p = pool(8);
    let plan = step(&mut p, &[k(0, 1), k(0, 2), k(0, 3)]);
    assert_eq!(
        (plan.n_hits(), plan.n_misses(), plan.n_evictions()),
        (0, 3, 0)
    );
    assert_eq!(plan.waves.len(), 1);
    let plan = step(&mut p, &[k(0, 2), k(0, 3), k(0, 4), k(0, 3)]);
    assert_eq!((plan.n_hits(), plan.n_misses()), (2, 1));
    let hit_keys: Vec<_> = plan.waves[0].hits.iter().map(|h| h.key).collect();
    assert_eq!(hit_keys, [k(0, 2), k(0, 3)]);
    assert_eq!(
        plan.waves[0].slot_of(k(0, 2)),
        Some(1),
        "a key keeps its slot"
    );
    assert_eq!(p.n_occupied(), 4);
    assert_eq!(p.request(&[]).unwrap(), RequestPlan::default());
}

#[test]
fn misses_evict_only_when_full_and_report_the_victim() {
    let mut p = pool(2);
    step(&mut p, &[k(1, 0)]);
    step(&mut p, &[k(1, 1)]);
    let plan = step(&mut p, &[k(1, 2)]);
    // Both used once; the older use counts less.
    let load = Load {
        key: k(1, 2),
        slot: 0,
        evicted: Some(k(1, 0)),
    };
    assert_eq!(plan.waves[0].misses, [load]);
    assert_eq!(p.lookup(k(1, 0)), None);
}

#[test]
fn the_request_pins_its_keys() {
    let mut p = pool(4);
    step(&mut p, &[k(0, 0), k(0, 1)]);
    // Two hits and two misses in a pool of 4: the misses take the two other slots.
    let plan = step(&mut p, &[k(0, 0), k(0, 1), k(0, 2), k(0, 3)]);
    assert_eq!(plan.waves.len(), 1);
    // A pool full of hits plus one miss: the miss waits for a second wave instead of evicting a hit.
    let plan = step(&mut p, &[k(0, 0), k(0, 1), k(0, 2), k(0, 3), k(0, 4)]);
    assert_eq!(plan.waves.len(), 2);
    assert_eq!(
        (plan.waves[0].hits.len(), plan.waves[0].misses.len()),
        (4, 0)
    );
    assert_eq!(plan.waves[1].misses.len(), 1);
}

#[test]
fn a_frequent_expert_survives_a_scan() {
    let mut p = pool(4);
    let hot = k(2, 7);
    for _ in 0..6 {
        step(&mut p, &[hot]);
    }
    // 40 experts used once each, one per step, through a pool of 4: LRU would evict `hot` at the 4th.
    for e in 10..50 {
        let plan = step(&mut p, &[k(2, e)]);
        assert!(plan.waves[0].misses[0].evicted != Some(hot));
    }
    assert_eq!(p.request(&[hot]).unwrap().n_hits(), 1);
}

#[test]
fn frequency_fades_with_the_half_life() {
    let cfg = PolicyConfig {
        half_life_steps: 4.0,
        ..PolicyConfig::new(2, 1, 100)
    };
    let mut p = SlotPolicy::new(cfg).unwrap();
    let old = k(0, 0);
    for _ in 0..3 {
        step(&mut p, &[old]);
    }
    // Then one new key per step: after a few half-lives a once-used key outranks 3 old uses.
    let evicted_at = (1..41).find(|&e| {
        step(&mut p, &[k(0, e)]);
        p.lookup(old).is_none()
    });
    assert!(matches!(evicted_at, Some(e) if e > 3), "{evicted_at:?}");
}

#[test]
fn eviction_order_on_a_crafted_sequence() {
    let mut p = pool(3);
    // a: 3 uses long ago; b: 2 uses since; c: 1 use, the latest.
    let (a, b, c) = (k(0, 0), k(0, 1), k(0, 2));
    for key in [a, a, a, b, b, c] {
        step(&mut p, &[key]);
    }
    let victims: Vec<_> = (3..6)
        .map(|e| step(&mut p, &[k(0, e)]).waves[0].misses[0].evicted.unwrap())
        .collect();
    // c goes first although it is the newest, then each new once-used key in turn (LRU: a, b, c).
    assert_eq!(victims, [c, k(0, 3), k(0, 4)]);
}

#[test]
fn the_layer_sweep_keeps_the_next_layers_experts() {
    // 3 layers using the same 2 experts every step: 6 keys cycling through 4 slots.
    let mut p = SlotPolicy::new(PolicyConfig::new(4, 3, 8)).unwrap();
    let mut hits = 0;
    for s in 0..60 {
        for layer in 0..3 {
            let plan = p.request(&[k(layer, 0), k(layer, 1)]).unwrap();
            check(&p, &plan, &[k(layer, 0), k(layer, 1)]);
            if s >= 30 {
                hits += plan.n_hits();
            }
            // Once the use counts have settled, the victims are of the layer needed last: the one before.
            for m in plan.waves.iter().flat_map(|w| &w.misses) {
                if let Some(v) = m.evicted.filter(|_| s >= 30) {
                    assert_eq!(v.layer, (layer + 2) % 3, "step {s} layer {layer}");
                }
            }
        }
        p.begin_step();
    }
    // LRU evicts each layer just before it is needed: 0 hits. Belady would reach 60 % here.
    assert!(hits * 2 >= 30 * 6, "{hits} hits of 180");
}

#[test]
fn waves_cover_the_needed_set_exactly_once() {
    for n_slots in [1usize, 2, 3, 5, 8] {
        let mut p = pool(n_slots);
        step(&mut p, &[k(3, 1), k(3, 60), k(1, 9)]);
        let keys: Vec<ExpertKey> = (0..20)
            .map(|e| k(3, e * 3 % 64))
            .chain([k(3, 1), k(3, 60)])
            .collect();
        let plan = p.request(&keys).unwrap();
        check(&p, &plan, &keys);
        assert_eq!(plan.n_hits() + plan.n_misses(), 22);
        // Waves are as full as the pool allows, hits first.
        assert_eq!(
            plan.waves.len(),
            22usize.div_ceil(n_slots),
            "{n_slots} slots"
        );
        assert!(plan.waves.iter().skip(1).all(|w| w.hits.is_empty()));
    }
}

#[test]
fn prefetch_never_evicts_pinned_or_requested_keys() {
    let mut p = pool(4);
    let used = [k(0, 0), k(0, 1), k(0, 2)];
    p.request(&used).unwrap();
    // One free slot: the first guess takes it; the others find only keys requested in this step.
    let plan = p.prefetch(&[k(1, 5), k(1, 6), k(1, 7)], 1.0).unwrap();
    let load = Load {
        key: k(1, 5),
        slot: 3,
        evicted: None,
    };
    assert_eq!(
        (plan.loads, plan.dropped),
        (vec![load], vec![k(1, 6), k(1, 7)])
    );
    assert!(used.iter().all(|&key| p.lookup(key).is_some()));
    // Nor another guess of the same step.
    assert_eq!(p.prefetch(&[k(1, 8)], 1.0).unwrap().dropped, [k(1, 8)]);
    // The guess is a hit, flagged as prefetched, once.
    let plan = p.request(&[k(1, 5)]).unwrap();
    let hit = Hit {
        key: k(1, 5),
        slot: 3,
        prefetched: true,
    };
    assert_eq!(
        (plan.waves[0].hits.clone(), plan.n_prefetch_hits()),
        (vec![hit], 1)
    );
    assert_eq!(p.request(&[k(1, 5)]).unwrap().n_prefetch_hits(), 0);
}

#[test]
fn a_prefetch_keeps_the_keys_it_finds_in_slots() {
    let mut p = pool(2);
    step(&mut p, &[k(0, 0), k(0, 1)]);
    // A step's certain set: k(0, 0) is already in a slot, k(0, 2) is not. Loading k(0, 2) must not evict
    // k(0, 0), which this step needs too; it takes k(0, 1)'s slot.
    let plan = p.prefetch(&[k(0, 0), k(0, 2)], 1.0).unwrap();
    assert_eq!(plan.present, 1);
    assert_eq!(plan.loads.len(), 1);
    assert_eq!(plan.loads[0].evicted, Some(k(0, 1)));
    let plan = p.request(&[k(0, 0), k(0, 2)]).unwrap();
    assert_eq!(
        (plan.n_hits(), plan.n_misses(), plan.n_prefetch_hits()),
        (2, 0, 1)
    );
}

#[test]
fn prefetch_evicts_only_keys_expected_after_the_guess() {
    let mut p = pool(2);
    let (hot, once) = (k(1, 0), k(1, 1));
    step(&mut p, &[hot, once]);
    for _ in 1..100 {
        step(&mut p, &[hot]);
    }
    // A 50 % guess for layer 3 (2 steps away, expected): `once` is expected in hundreds, `hot` in about one.
    let plan = p.prefetch(&[k(3, 5), k(3, 6)], 0.5).unwrap();
    let load = Load {
        key: k(3, 5),
        slot: 1,
        evicted: Some(once),
    };
    assert_eq!((plan.loads, plan.dropped), (vec![load], vec![k(3, 6)]));
    assert_eq!(p.prefetch(&[k(3, 5)], 1.0).unwrap().present, 1);
}

#[test]
fn an_unused_guess_loses_its_weight_at_the_next_step() {
    let mut p = SlotPolicy::new(PolicyConfig::new(2, 2, 8)).unwrap();
    p.request(&[k(0, 0)]).unwrap();
    p.prefetch(&[k(1, 3)], 1.0).unwrap();
    p.begin_step();
    // k(1, 3) was never requested: it goes before a key used once.
    let plan = p.request(&[k(0, 1)]).unwrap();
    assert_eq!(plan.waves[0].misses[0].evicted, Some(k(1, 3)));
}

#[test]
fn requests_evict_unused_prefetches_last() {
    let mut p = pool(3);
    step(&mut p, &[k(0, 0)]);
    p.prefetch(&[k(1, 0), k(1, 1)], 1.0).unwrap();
    // Two misses: one takes the cold key's slot, the other a guess's.
    let plan = p.request(&[k(0, 5), k(0, 6)]).unwrap();
    let evicted: Vec<_> = plan.waves[0].misses.iter().map(|m| m.evicted).collect();
    assert_eq!(evicted[0], Some(k(0, 0)));
    assert!(matches!(evicted[1], Some(key) if key.layer == 1));
}

#[test]
fn locked_slots_are_never_evicted_and_a_fully_locked_pool_is_an_error() {
    let mut p = pool(2);
    let plan = step(&mut p, &[k(0, 0), k(0, 1)]);
    let s0 = plan.waves[0].slot_of(k(0, 0)).unwrap();
    let s1 = plan.waves[0].slot_of(k(0, 1)).unwrap();
    p.lock(s0).unwrap();
    assert!(p.is_locked(s0));
    let keys = [k(0, 2), k(0, 3), k(0, 4)];
    let plan = p.request(&keys).unwrap();
    check(&p, &plan, &keys);
    assert_eq!(plan.waves.len(), 3);
    assert!(plan.entries().all(|(_, s)| s == s1));
    assert_eq!(p.lookup(k(0, 0)), Some(s0));
    p.lock(s1).unwrap();
    let err = p.request(&[k(0, 9)]).unwrap_err();
    let want = PolicyError::NoSlotAvailable {
        key: k(0, 9),
        n_slots: 2,
    };
    assert_eq!(err, want);
    assert_eq!(
        p.lookup(k(0, 4)),
        Some(s1),
        "a refused request changes nothing"
    );
    // Hits still work with every slot locked; prefetches are dropped.
    assert_eq!(p.request(&[k(0, 0)]).unwrap().n_hits(), 1);
    assert_eq!(p.prefetch(&[k(0, 9)], 1.0).unwrap().dropped, [k(0, 9)]);
    p.unlock(s1).unwrap();
    assert_eq!(p.request(&[k(0, 9)]).unwrap().n_misses(), 1);
    assert!(p.lock(7).is_err() && p.unlock(7).is_err());
}

#[test]
fn invalidate_frees_the_slot() {
    let mut p = pool(2);
    let slot = p.request(&[k(0, 3)]).unwrap().waves[0].misses[0].slot;
    assert_eq!(p.invalidate(slot).unwrap(), Some(k(0, 3)));
    assert_eq!(p.lookup(k(0, 3)), None);
    let plan = p.request(&[k(0, 3)]).unwrap();
    assert_eq!(
        (plan.n_misses(), plan.waves[0].misses[0].evicted),
        (1, None)
    );
    let err = PolicyError::SlotOutOfRange {
        slot: 9,
        n_slots: 2,
    };
    assert_eq!(p.invalidate(9), Err(err));
}

#[test]
fn bad_input_is_an_error() {
    let new =
        |n_slots, n_layer, n_expert| SlotPolicy::new(PolicyConfig::new(n_slots, n_layer, n_expert));
    assert_eq!(new(0, 4, 4).unwrap_err(), PolicyError::NoSlots);
    assert!(new(4, 0, 4).is_err() && new(4, 4, 0).is_err());
    assert!(new(4, u32::MAX, u32::MAX).is_err() && new(4, MAX_LAYERS + 1, 1).is_err());
    for h in [f64::NAN, 0.0, -1.0, f64::INFINITY] {
        let cfg = PolicyConfig {
            half_life_steps: h,
            ..PolicyConfig::new(4, 4, 4)
        };
        assert!(matches!(
            SlotPolicy::new(cfg),
            Err(PolicyError::BadHalfLife(_))
        ));
    }
    let mut p = pool(4);
    let out =
        |r: Result<RequestPlan, PolicyError>| matches!(r, Err(PolicyError::KeyOutOfRange { .. }));
    assert!(out(p.request(&[k(0, 0), k(4, 0)])) && out(p.request(&[k(0, 64)])));
    assert_eq!(p.n_occupied(), 0, "a refused request changes nothing");
    assert!(p.prefetch(&[k(0, 0)], 0.0).is_err());
    assert!(p.prefetch(&[k(0, 0)], f64::NAN).is_err());
    assert!(p.prefetch(&[k(0, 0)], 1.5).is_err());
    assert!(p.prefetch(&[k(9, 0)], 1.0).is_err());
}

/// A fixed pseudo-random trace (xorshift) of requests and prefetches, layer after layer.
fn run_trace(p: &mut SlotPolicy, seed: u64, reverse: bool) -> Vec<(RequestPlan, PrefetchPlan)> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    for _ in 0..200 {
        for layer in 0..4 {
            // Skewed: low expert ids are more popular.
            let mut keys: Vec<ExpertKey> = (0..6)
                .map(|_| k(layer, ((next() % 64) * (next() % 64) / 64) as u32))
                .collect();
            if reverse {
                keys.reverse();
            }
            let guess: Vec<ExpertKey> = (0..2)
                .map(|_| k((layer + 1) % 4, (next() % 16) as u32))
                .collect();
            let plan = p.request(&keys).unwrap();
            check(p, &plan, &keys);
            out.push((plan, p.prefetch(&guess, 0.5).unwrap()));
        }
        p.begin_step();
    }
    out
}

#[test]
fn same_calls_give_the_same_plans() {
    let (mut a, mut b, mut c) = (pool(10), pool(10), pool(10));
    let ra = run_trace(&mut a, 42, false);
    assert_eq!(ra, run_trace(&mut b, 42, false));
    // The order of the keys within a request does not matter.
    assert_eq!(ra, run_trace(&mut c, 42, true));
    let hits: usize = ra.iter().map(|(r, _)| r.n_hits()).sum();
    let prefetch_hits: usize = ra.iter().map(|(r, _)| r.n_prefetch_hits()).sum();
    assert!(hits > 0 && prefetch_hits > 0);
}

/// The second tier: every use counts, cached keys stay, misses take free slots, and then only replace a key
/// expected later (a hot key is not pushed out by a key seen once; a key used often comes in).
#[test]
fn admit_fills_free_slots_then_keeps_the_hotter_keys() {
    let mut p = pool(2);
    p.begin_step();
    let plan = p.admit(&[k(0, 1), k(0, 2), k(0, 1)]).unwrap();
    assert_eq!(plan.loads.len(), 2, "free slots take the misses");
    assert_eq!(plan.present, 0);
    assert!(p.lookup(k(0, 1)).is_some() && p.lookup(k(0, 2)).is_some());
    // Key 1 is used every step, key 2 once; key 3 comes every step from step 2 on.
    for step in 0..12 {
        p.begin_step();
        let mut keys = vec![k(0, 1)];
        if step >= 1 {
            keys.push(k(0, 3));
        }
        let plan = p.admit(&keys).unwrap();
        // Used keys of this step are never the victim.
        for l in &plan.loads {
            assert_ne!(l.evicted, Some(k(0, 1)));
        }
        assert!(p.lookup(k(0, 1)).is_some(), "the hottest key stays");
    }
    assert!(
        p.lookup(k(0, 3)).is_some(),
        "a key used every step comes in"
    );
    assert!(
        p.lookup(k(0, 2)).is_none(),
        "and pushes out the key used once"
    );
    // Within one step, a key used in it is never evicted by a later admission of the same step.
    p.begin_step();
    p.admit(&[k(0, 1), k(0, 3)]).unwrap();
    let plan = p.admit(&[k(1, 9)]).unwrap();
    assert!(plan.loads.is_empty() && plan.dropped == vec![k(1, 9)]);
}

/// The second tier under routing close to uniform (each step 2 of 16 keys, drawn at random, 4 slots): once the free
/// slots are filled, keys of about the same history do not trade places, so uploads stay rare (each costs more than
/// computing the key from the other memory). With the plain "expected later" rule (margin 1), 117 of 760 uses
/// were uploads.
#[test]
fn admit_does_not_churn_under_uniform_routing() {
    let mut p = pool(4);
    let mut rng = 0x9e37_79b9_u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as u32 % 16
    };
    let (mut uses, mut loads) = (0usize, 0usize);
    for step in 0..400 {
        p.begin_step();
        let keys = [k(0, next()), k(0, next())];
        let plan = p.admit(&keys).unwrap();
        if step >= 20 {
            uses += keys.len();
            loads += plan.loads.len();
        }
    }
    assert!(
        loads * 20 < uses,
        "{loads} uploads for {uses} uses: the cache churns"
    );
}

/// Ahead-of-use admission places exactly what [`SlotPolicy::admit`] would once the guess comes true: driven by the
/// same uses, a tier that admits each layer's keys ahead (guesses right) and then after the layer loads the same
/// keys at the same steps and ends with the same contents as one that only admits after the layer.
#[test]
fn admit_ahead_with_right_guesses_loads_what_admit_would() {
    let (mut ahead, mut after) = (pool(6), pool(6));
    let mut rng = 0x2545_f491_u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as u32
    };
    for _ in 0..300 {
        ahead.begin_step();
        after.begin_step();
        for layer in 0..4 {
            // Skewed: experts 0-3 often, the rest of 0-15 now and then.
            let keys: Vec<ExpertKey> = (0..3)
                .map(|_| {
                    let r = next();
                    k(layer, if r % 4 == 0 { r / 4 % 16 } else { r / 4 % 4 })
                })
                .collect();
            let early = ahead.admit_ahead(&keys).unwrap();
            let late = ahead.admit(&keys).unwrap();
            assert!(
                late.loads.is_empty(),
                "a right guess is present after its layer"
            );
            assert_eq!(late.ahead_used, early.loads.len());
            let plain = after.admit(&keys).unwrap();
            let loaded = |p: &PrefetchPlan| {
                p.loads
                    .iter()
                    .map(|l| (l.key, l.evicted))
                    .collect::<Vec<_>>()
            };
            assert_eq!(loaded(&early), loaded(&plain));
        }
        let contents = |p: &SlotPolicy| {
            (0..p.n_slots() as SlotId)
                .map(|s| p.key_in(s))
                .collect::<Vec<_>>()
        };
        assert_eq!(contents(&ahead), contents(&after));
    }
}

/// A guess is not a use: a wrong one keeps only its history's priority and leaves at the next admission that needs
/// its slot; a right one is protected for the rest of its step; a guess never used does not push out hot keys.
#[test]
fn admit_ahead_counts_no_use() {
    let mut p = pool(2);
    // Keys 1 and 2 of layer 0 used every step for a while: hot.
    for _ in 0..8 {
        p.begin_step();
        p.admit(&[k(0, 1), k(0, 2)]).unwrap();
    }
    p.begin_step();
    let plan = p.admit_ahead(&[k(1, 5)]).unwrap();
    assert!(
        plan.loads.is_empty() && plan.dropped == vec![k(1, 5)],
        "a cold guess does not evict hot keys"
    );

    // A free slot takes a guess; within its step no admission evicts it.
    let mut p = pool(2);
    p.begin_step();
    p.admit(&[k(0, 1)]).unwrap();
    let plan = p.admit_ahead(&[k(1, 7)]).unwrap();
    assert_eq!(plan.loads.len(), 1);
    let plan = p.admit(&[k(2, 3)]).unwrap();
    assert!(
        plan.loads.is_empty(),
        "the guessed key keeps its slot in its step"
    );
    // The guess was wrong (layer 1 used nothing): key (2, 3), used in two steps now, replaces it; the key used
    // every step stays.
    p.begin_step();
    p.admit(&[k(0, 1)]).unwrap();
    let plan = p.admit(&[k(2, 3)]).unwrap();
    assert_eq!(plan.loads.len(), 1);
    assert_eq!(plan.loads[0].evicted, Some(k(1, 7)));
    assert!(p.lookup(k(0, 1)).is_some());
}
