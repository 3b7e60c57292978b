package batchstore

import (
	"context"
	"fmt"
	"time"
)

// Lease acquires or renews the lease name for holder until now+ttl: it
// succeeds if the lease is free, expired (its end at or before now), or
// already holder's. It returns false if another holder's lease has not
// expired. Holders should renew well within ttl, and the clocks of the
// replicas passing now should agree to well within ttl.
func (s *Store) Lease(ctx context.Context, name, holder string, ttl time.Duration, now time.Time) (bool, error) {
	if ttl <= 0 {
		return false, fmt.Errorf("batchstore: lease %s: ttl %v <= 0", name, ttl)
	}
	// One statement, so that two replicas racing for a free lease cannot
	// both win: the upsert's WHERE is evaluated against the row as locked.
	res, err := s.w.ExecContext(ctx, s.d.q(`INSERT INTO bs_leases (name, holder, expires_at) VALUES (?, ?, ?)
		ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
		WHERE bs_leases.holder = excluded.holder OR bs_leases.expires_at <= ?`),
		name, holder, now.Add(ttl).UnixMilli(), now.UnixMilli())
	if err != nil {
		return false, fmt.Errorf("batchstore: lease %s: %w", name, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("batchstore: lease %s: %w", name, err)
	}
	return n == 1, nil
}
