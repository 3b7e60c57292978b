package podcost

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Annotation is the Pod annotation the ReplicaSet controller ranks pods by
// when it scales in: lower cost, deleted first.
const Annotation = "controller.kubernetes.io/pod-deletion-cost"

// IdleCost is the cost of a worker with nothing in flight.
const IdleCost = 0

// Config says which Pod to keep current and how often.
type Config struct {
	// Namespace and Name are the worker's own Pod (downward API:
	// metadata.namespace, metadata.name). Required.
	Namespace, Name string
	// InFlight returns the work the worker holds now. Required.
	InFlight func() int
	// Poll is how often InFlight is read (default 500ms).
	Poll time.Duration
	// MinInterval is the least time between two patches (default 5s),
	// except that an idle worker turning busy is patched at once.
	MinInterval time.Duration
	// Timeout bounds one patch (default 5s).
	Timeout time.Duration
}

func (c Config) withDefaults() Config {
	if c.Poll <= 0 {
		c.Poll = 500 * time.Millisecond
	}
	if c.MinInterval <= 0 {
		c.MinInterval = 5 * time.Second
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	return c
}

// Keeper keeps one Pod's deletion cost current.
type Keeper struct {
	cfg   Config
	pods  podPatcher
	log   *slog.Logger
	clock func() time.Time

	patched   bool // a patch has succeeded
	cost      int  // the cost last patched
	lastTry   time.Time
	failing   bool
	failures  int // patches that failed
	successes int // patches that succeeded
}

// podPatcher is the one call a Keeper makes on the apiserver.
type podPatcher interface {
	patch(ctx context.Context, namespace, name string, body []byte) error
}

type clientPatcher struct{ c kubernetes.Interface }

func (p clientPatcher) patch(ctx context.Context, namespace, name string, body []byte) error {
	_, err := p.c.CoreV1().Pods(namespace).Patch(ctx, name, types.MergePatchType, body, metav1.PatchOptions{FieldManager: "sous-worker"})
	return err
}

// New returns a Keeper that patches through client.
func New(cfg Config, client kubernetes.Interface, log *slog.Logger) (*Keeper, error) {
	return newKeeper(cfg, clientPatcher{client}, log)
}

// NewForConfig returns a Keeper that patches through a client made from
// rc (rest.InClusterConfig in a Pod).
func NewForConfig(cfg Config, rc *rest.Config, log *slog.Logger) (*Keeper, error) {
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("pod deletion cost: kubernetes client: %w", err)
	}
	return New(cfg, client, log)
}

func newKeeper(cfg Config, p podPatcher, log *slog.Logger) (*Keeper, error) {
	if cfg.Namespace == "" || cfg.Name == "" {
		return nil, errors.New("pod deletion cost: the pod's name and namespace are required (downward API: metadata.name, metadata.namespace)")
	}
	if cfg.InFlight == nil {
		return nil, errors.New("pod deletion cost: no InFlight func")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Keeper{cfg: cfg.withDefaults(), pods: p, log: log.With("pod", cfg.Name, "namespace", cfg.Namespace), clock: time.Now}, nil
}

// Cost is the deletion cost of a worker holding inFlight deliveries.
func Cost(inFlight int) int {
	if inFlight <= 0 {
		return IdleCost
	}
	// The annotation is an int32.
	return min(inFlight, math.MaxInt32)
}

// Run keeps the annotation current until ctx ends. It patches once at the
// start, so a new Pod says it is idle.
func (k *Keeper) Run(ctx context.Context) {
	t := time.NewTicker(k.cfg.Poll)
	defer t.Stop()
	for {
		k.Sync(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Sync patches the annotation if the cost changed and the rate limit
// allows; Run calls it on every poll.
func (k *Keeper) Sync(ctx context.Context) {
	want := Cost(k.cfg.InFlight())
	if k.patched && want == k.cost {
		return
	}
	now := k.clock()
	becameBusy := k.patched && k.cost == IdleCost && want != IdleCost
	if !k.lastTry.IsZero() && now.Sub(k.lastTry) < k.cfg.MinInterval && !becameBusy {
		return
	}
	if becameBusy && k.failing && now.Sub(k.lastTry) < k.cfg.MinInterval {
		return // a failing apiserver is not retried faster than MinInterval
	}
	k.lastTry = now
	body := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:%q}}}`, Annotation, strconv.Itoa(want))
	pctx, cancel := context.WithTimeout(ctx, k.cfg.Timeout)
	err := k.pods.patch(pctx, k.cfg.Namespace, k.cfg.Name, body)
	cancel()
	if err != nil {
		k.failures++
		if ctx.Err() != nil {
			return
		}
		if !k.failing {
			k.log.Warn("pod deletion cost: patch failed; the worker goes on, a scale-in may pick this pod regardless of its work", "err", err, "hint", hint(err))
		}
		k.failing = true
		return
	}
	k.successes++
	if k.failing {
		k.log.Info("pod deletion cost: patching again", "cost", want)
	}
	k.failing = false
	k.patched = true
	k.cost = want
}

func hint(err error) string {
	switch {
	case apierrors.IsForbidden(err):
		return "the service account needs a Role allowing patch on pods (deploy/k8s/base/role.yaml)"
	case apierrors.IsNotFound(err):
		return "POD_NAME or POD_NAMESPACE does not name this pod (set them with the downward API)"
	default:
		return "the apiserver could not be reached; retrying"
	}
}
