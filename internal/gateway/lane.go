package gateway

import (
	"net/http"
	"strings"

	"github.com/sous-run/sous/internal/lanes"
)

// LaneHeader names the lane a request goes to (SOUS_GATEWAY_LANES).
const LaneHeader = "X-Sous-Lane"

// lane picks the lane of a request: the one LaneHeader names, else the
// key's default (the first of its lanes=), else the gateway's first lane.
// Without lanes every request goes to Config.Queue, and a LaneHeader is
// refused rather than ignored, so that a client that counts on a lane
// learns that the gateway has none. The lane's name is "" then.
func (s *Server) lane(r *http.Request, k *Key) (lanes.Lane, *apiError) {
	name := strings.TrimSpace(r.Header.Get(LaneHeader))
	if len(s.cfg.Lanes) == 0 {
		if name != "" {
			return lanes.Lane{}, errLanesNotConfigured()
		}
		return lanes.Lane{Queue: s.cfg.Queue}, nil
	}
	if name == "" {
		if k != nil && len(k.Lanes) > 0 {
			name = k.Lanes[0]
		} else {
			return s.cfg.Lanes[0], nil
		}
	}
	l, ok := lanes.Find(s.cfg.Lanes, name)
	if !ok {
		return lanes.Lane{}, errUnknownLane(name, lanes.Names(s.cfg.Lanes))
	}
	if k != nil && !k.AllowsLane(name) {
		return lanes.Lane{}, errLaneNotAllowed(name, k.Lanes)
	}
	return l, nil
}
