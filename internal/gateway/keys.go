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
	// Lanes the key may publish to, its default first; empty means every
	// lane, the first lane of the gateway's being the default.
	Lanes []string

	bucket *bucket
}

// Allows reports whether the key may use model.
func (k *Key) Allows(model string) bool {
	return len(k.Models) == 0 || slices.Contains(k.Models, model)
}

// AllowsLane reports whether the key may publish to the lane named name.
func (k *Key) AllowsLane(name string) bool {
	return len(k.Lanes) == 0 || slices.Contains(k.Lanes, name)
}

// Keys is the set of API keys read from a file with one key per line:
//
//	# comment
//	<name> <hex SHA-256 of the key> [models=a,b] [rate=N] [lanes=a,b]
//
// models= limits the key to those models; rate= is its requests per
// second; lanes= limits it to those lanes (SOUS_GATEWAY_LANES), the first
// being its default. Lookups compare the presented key's hash with every
// entry in constant time. Keys is safe for concurrent use.
type Keys struct {
	path        string
	defaultRate float64
	lanes       []string // the lanes keys may name; nil: none (lanes= is refused)
	log         *slog.Logger

	mu      sync.RWMutex
	keys    []*Key
	modTime time.Time
	size    int64
}

// LoadKeys reads path. defaultRate applies to keys without rate= (0: no
// limit). lanes are the names of the gateway's lanes, which lanes= may
// name; nil: the gateway has none, and a line with lanes= is an error (so
// is a lane not in lanes), at the start and at every reload.
func LoadKeys(path string, defaultRate float64, lanes []string, log *slog.Logger) (*Keys, error) {
	k := &Keys{path: path, defaultRate: defaultRate, lanes: lanes, log: log}
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
			case "lanes":
				if k.Lanes != nil {
					return nil, fmt.Errorf("line %d (%s): lanes= is given twice", n, k.Name)
				}
				k.Lanes = []string{}
				for j, l := range strings.Split(v, ",") {
					// Never echo a name: it may be a key pasted by mistake.
					if l = strings.TrimSpace(l); !validLaneName(l) || slices.Contains(k.Lanes, l) {
						return nil, fmt.Errorf("line %d (%s): lane %d of lanes= is empty, listed twice or not a lane name (letters, digits, '-', '_'); write lanes=a,b", n, k.Name, j+1)
					}
					k.Lanes = append(k.Lanes, l)
				}
			default:
				// Never echo the field: it may be a key pasted by mistake.
				return nil, fmt.Errorf("line %d (%s): field %d is not models=a,b, rate=N or lanes=a,b", n, k.Name, i+3)
			}
		}
		if k.Rate > 0 {
			k.bucket = newBucket(k.Rate)
		}
		out = append(out, k)
	}
	return out, sc.Err()
}

// validLaneName is internal/lanes' rule for a lane's name.
func validLaneName(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return s != ""
}

// checkLanes refuses a key whose lanes= names a lane the gateway does not
// have (known: its lanes; nil: it has none).
func checkLanes(keys []*Key, known []string) error {
	for _, k := range keys {
		if len(k.Lanes) == 0 {
			continue
		}
		if len(known) == 0 {
			return fmt.Errorf("key %s: lanes= needs SOUS_GATEWAY_LANES, which is not set", k.Name)
		}
		for j, l := range k.Lanes {
			if !slices.Contains(known, l) {
				// Never echo the name: it may be a key pasted by mistake.
				return fmt.Errorf("key %s: lane %d of lanes= is not one of SOUS_GATEWAY_LANES's (%s)", k.Name, j+1, strings.Join(known, ", "))
			}
		}
	}
	return nil
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
	if err == nil {
		err = checkLanes(keys, k.lanes)
	}
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

// Named returns the key named name, or nil: the Batch API checks a
// batch's lines against the models its key may use when it validates
// them, after the request that created it.
func (k *Keys) Named(name string) *Key {
	k.mu.RLock()
	defer k.mu.RUnlock()
	for _, e := range k.keys {
		if e.Name == name {
			return e
		}
	}
	return nil
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
