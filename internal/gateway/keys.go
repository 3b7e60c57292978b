package gateway

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Key is one API key's entry in the keys file. The key itself is never
// held: only its SHA-256.
type Key struct {
	// Name identifies the key in logs; it is not secret.
	Name string
	hash [sha256.Size]byte
	// Models the key may use; empty means every model the gateway allows.
	Models []string
	// Rate is requests per second the key may make (0: no limit of its
	// own, the gateway's default applies).
	Rate float64

	bucket *bucket
}

// Allows reports whether the key may use model.
func (k *Key) Allows(model string) bool {
	return len(k.Models) == 0 || slices.Contains(k.Models, model)
}

// Keys is the set of API keys read from a file with one key per line:
//
//	# comment
//	<name> <hex SHA-256 of the key> [models=a,b] [rate=N]
//
// models= limits the key to those models; rate= is its requests per
// second. Lookups compare the presented key's hash with every entry in
// constant time. Keys is safe for concurrent use.
type Keys struct {
	path        string
	defaultRate float64
	log         *slog.Logger

	mu      sync.RWMutex
	keys    []*Key
	modTime time.Time
	size    int64
}

// LoadKeys reads path. defaultRate applies to keys without rate= (0: no
// limit).
func LoadKeys(path string, defaultRate float64, log *slog.Logger) (*Keys, error) {
	k := &Keys{path: path, defaultRate: defaultRate, log: log}
	if _, err := k.reload(); err != nil {
		return nil, err
	}
	return k, nil
}

// ParseKeys parses a keys file's content.
func ParseKeys(b []byte, defaultRate float64) ([]*Key, error) {
	var out []*Key
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return nil, fmt.Errorf("line %d: want \"<name> <hex sha256 of the key>\"", n)
		}
		k := &Key{Name: f[0], Rate: defaultRate}
		h, err := hex.DecodeString(f[1])
		if err != nil || len(h) != sha256.Size {
			// The line may hold a key pasted by mistake: never echo it.
			return nil, fmt.Errorf("line %d (%s): the second field must be the 64 hex digits of the key's SHA-256 (sha256sum), not the key", n, k.Name)
		}
		copy(k.hash[:], h)
		for i, opt := range f[2:] {
			name, v, _ := strings.Cut(opt, "=")
			switch name {
			case "models":
				for _, m := range strings.Split(v, ",") {
					if m = strings.TrimSpace(m); m != "" {
						k.Models = append(k.Models, m)
					}
				}
			case "rate":
				r, err := strconv.ParseFloat(v, 64)
				if err != nil || r < 0 {
					return nil, fmt.Errorf("line %d (%s): rate= must be requests per second, a number ≥ 0", n, k.Name)
				}
				k.Rate = r
			default:
				// Never echo the field: it may be a key pasted by mistake.
				return nil, fmt.Errorf("line %d (%s): field %d is not models=a,b or rate=N", n, k.Name, i+3)
			}
		}
		if k.Rate > 0 {
			k.bucket = newBucket(k.Rate)
		}
		out = append(out, k)
	}
	return out, sc.Err()
}

// reload reads the file again when its size or modification time
// changed; it reports whether it did.
func (k *Keys) reload() (bool, error) {
	st, err := os.Stat(k.path)
	if err != nil {
		return false, fmt.Errorf("keys file: %w", err)
	}
	k.mu.RLock()
	same := st.ModTime().Equal(k.modTime) && st.Size() == k.size && k.keys != nil
	k.mu.RUnlock()
	if same {
		return false, nil
	}
	b, err := os.ReadFile(k.path)
	if err != nil {
		return false, fmt.Errorf("keys file: %w", err)
	}
	keys, err := ParseKeys(b, k.defaultRate)
	if err != nil {
		return false, fmt.Errorf("keys file %s: %w", k.path, err)
	}
	if len(keys) == 0 {
		// Most likely a file caught mid-write (truncated, not yet
		// written): keeping the keys in force beats locking everyone out.
		return false, fmt.Errorf("keys file %s holds no keys; to shut everyone out, stop the gateway", k.path)
	}
	k.mu.Lock()
	// A key that stays keeps its rate bucket, so a reload does not refill it.
	for _, nk := range keys {
		for _, old := range k.keys {
			if old.hash == nk.hash && old.bucket != nil && nk.bucket != nil && old.Rate == nk.Rate {
				nk.bucket = old.bucket
			}
		}
	}
	k.keys, k.modTime, k.size = keys, st.ModTime(), st.Size()
	k.mu.Unlock()
	return true, nil
}

// Watch reloads the file every interval until ctx is done. A file that
// no longer parses, or holds no keys, keeps the previous keys, with an
// error logged.
func (k *Keys) Watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			changed, err := k.reload()
			switch {
			case err != nil:
				k.log.Error("API keys not reloaded; the previous keys stay in force", "err", err)
			case changed:
				k.log.Info("API keys reloaded", "keys", k.Len())
			}
		}
	}
}

// Len is the number of keys.
func (k *Keys) Len() int {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return len(k.keys)
}

// Lookup returns the key whose SHA-256 matches presented, or nil. Every
// entry is compared, in constant time, whatever matches.
func (k *Keys) Lookup(presented string) *Key {
	sum := sha256.Sum256([]byte(presented))
	k.mu.RLock()
	defer k.mu.RUnlock()
	var found *Key
	for _, e := range k.keys {
		if subtle.ConstantTimeCompare(sum[:], e.hash[:]) == 1 {
			found = e
		}
	}
	return found
}

// bucket is a token bucket: rate tokens a second, a burst of max(1, rate).
type bucket struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func newBucket(rate float64) *bucket {
	burst := max(1, rate)
	return &bucket{rate: rate, burst: burst, tokens: burst}
}

// take spends one token at now, or says how long until one is there.
func (b *bucket) take(now time.Time) (ok bool, wait time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.last.IsZero() {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / b.rate * float64(time.Second))
}
