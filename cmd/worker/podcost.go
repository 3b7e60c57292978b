package main

import (
	"context"
	"log/slog"
	"strings"
	"sync"

	"k8s.io/client-go/rest"

	"github.com/sous-run/sous/internal/podcost"
)

// podCostConfig is busy-aware scale-in (internal/podcost): the worker keeps
// its own Pod's controller.kubernetes.io/pod-deletion-cost current, so a
// scale-in deletes idle workers first.
type podCostConfig struct {
	// Mode is auto (on inside a Kubernetes Pod that has POD_NAME and
	// POD_NAMESPACE), on, or off (SOUS_POD_DELETION_COST, default auto).
	Mode string `env:"SOUS_POD_DELETION_COST" envDefault:"auto"`
	// PodName and PodNamespace are the worker's own Pod, from the downward
	// API (POD_NAME, POD_NAMESPACE).
	PodName      string `env:"POD_NAME"`
	PodNamespace string `env:"POD_NAMESPACE"`
	// ServiceHost is set by Kubernetes in every container
	// (KUBERNETES_SERVICE_HOST); auto is off without it.
	ServiceHost string `env:"KUBERNETES_SERVICE_HOST"`
}

func (c podCostConfig) validate() error {
	switch strings.ToLower(c.Mode) {
	case "auto", "off":
	case "on":
		if c.PodName == "" {
			return bad("POD_NAME", "SOUS_POD_DELETION_COST=on needs the pod's name: set POD_NAME from the downward API (fieldRef metadata.name)")
		}
		if c.PodNamespace == "" {
			return bad("POD_NAMESPACE", "SOUS_POD_DELETION_COST=on needs the pod's namespace: set POD_NAMESPACE from the downward API (fieldRef metadata.namespace)")
		}
	default:
		return bad("SOUS_POD_DELETION_COST", "must be auto, on or off, not %q", c.Mode)
	}
	return nil
}

func (c podCostConfig) enabled() bool {
	switch strings.ToLower(c.Mode) {
	case "on":
		return true
	case "auto":
		return c.ServiceHost != "" && c.PodName != "" && c.PodNamespace != ""
	}
	return false
}

// startPodCost starts keeping the Pod's deletion cost when enabled and
// returns the function that stops it and waits. It fails soft: without a
// usable in-cluster config it logs why and the worker runs on without it.
func startPodCost(ctx context.Context, c podCostConfig, inFlight func() int, log *slog.Logger) (stop func()) {
	if !c.enabled() {
		return func() {}
	}
	rc, err := rest.InClusterConfig()
	if err != nil {
		log.Warn("pod deletion cost: off, no in-cluster Kubernetes config (mount the service account token, or set SOUS_POD_DELETION_COST=off)", "err", err)
		return func() {}
	}
	k, err := podcost.NewForConfig(podcost.Config{Namespace: c.PodNamespace, Name: c.PodName, InFlight: inFlight}, rc, log)
	if err != nil {
		log.Warn("pod deletion cost: off", "err", err)
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { k.Run(ctx) })
	log.Info("pod deletion cost: keeping it current", "pod", c.PodName, "namespace", c.PodNamespace)
	return func() {
		cancel()
		wg.Wait()
	}
}
