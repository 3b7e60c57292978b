package k8s

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/sous-run/sous/integration/itest"
)

const (
	// adapterService is the Service the APIService names; KEDA's chart
	// calls it the same.
	adapterService = "keda-metrics-apiserver"
	// ExternalMetricsAPIService is the APIService KEDA's adapter serves.
	ExternalMetricsAPIService = "v1beta1.external.metrics.k8s.io"
)

var apiServices = schema.GroupVersionResource{Group: "apiregistration.k8s.io", Version: "v1", Resource: "apiservices"}

// StartKEDAAdapter runs KEDA's metrics apiserver out of cluster until t
// ends and registers it with the apiserver's aggregation layer as
// external.metrics.k8s.io, which the HPA controller reads: what 1 ↔ N
// needs. StartKEDA must have run (the adapter asks the operator for each
// metric over gRPC, with mutual TLS).
//
// Everything stays on loopback. The APIService points at a Service of
// type ExternalName whose externalName is 127.0.0.1: without
// --enable-aggregator-routing the apiserver resolves an APIService's
// Service with k8s.io/apiserver/pkg/util/proxy.ResolveCluster, which for
// ExternalName returns https://<externalName>:<APIService port>, so no
// ClusterIP, kube-proxy or endpoints are involved.
func (c *ControlPlane) StartKEDAAdapter(t testing.TB) {
	t.Helper()
	if err := c.startKEDAAdapter(t); err != nil {
		t.Fatalf("k8s: KEDA metrics adapter: %v", err)
	}
}

func (c *ControlPlane) startKEDAAdapter(t testing.TB) error {
	if c.keda.grpcAddr == "" {
		return errors.New("StartKEDA first: the adapter reads metrics from the operator")
	}
	began := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	port := itest.FreePort(t)
	dir := c.keda.certDir
	p, err := startProcess(c.Dir, "keda-adapter", c.bins.KEDAAdapter,
		[]string{
			"KUBECONFIG=" + c.Kubeconfig, // controller-runtime's client
			"WATCH_NAMESPACE=",
			"POD_NAMESPACE=" + KEDANamespace,
			"KEDA_CLUSTER_OBJECT_NAMESPACE=" + KEDANamespace,
		},
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(port),
		"--cert-dir="+dir,
		"--tls-cert-file="+filepath.Join(dir, "tls.crt"),
		"--tls-private-key-file="+filepath.Join(dir, "tls.key"),
		// The aggregator's front-proxy CA and the allowed names come from
		// kube-system/extension-apiserver-authentication, read with this.
		"--authentication-kubeconfig="+c.Kubeconfig,
		"--authorization-kubeconfig="+c.Kubeconfig,
		"--lister-kubeconfig="+c.Kubeconfig,
		"--metrics-service-address="+c.keda.grpcAddr,
		"--port="+strconv.Itoa(itest.FreePort(t)), // its /metrics, on 127.0.0.1 (tools/keda/adapter)
		"--zap-log-level=info",
		"--zap-encoder=console",
	)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, p)
	if err := c.waitFor(ctx, p, httpsOK(c.ca, "https://127.0.0.1:"+strconv.Itoa(port)+"/readyz")); err != nil {
		return fmt.Errorf("adapter not ready: %w\n--- log ---\n%s", err, p.tail(40))
	}

	objs, err := Decode(fmt.Appendf(nil, `apiVersion: v1
kind: Service
metadata: {name: %[1]s, namespace: %[2]s}
spec: {type: ExternalName, externalName: 127.0.0.1}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: %[3]s}
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service: {name: %[1]s, namespace: %[2]s, port: %[4]d}
  caBundle: %[5]s
`, adapterService, KEDANamespace, ExternalMetricsAPIService, port, base64.StdEncoding.EncodeToString(c.ca.certPEM)))
	if err != nil {
		return err
	}
	if err := c.ApplyObjects(ctx, objs); err != nil {
		return err
	}
	if err := c.waitFor(ctx, p, c.apiServiceAvailable(ExternalMetricsAPIService)); err != nil {
		return fmt.Errorf("%w\n--- kube-apiserver ---\n%s\n--- keda-adapter ---\n%s", err, c.procByName("kube-apiserver").tail(20), p.tail(40))
	}
	t.Logf("k8s: KEDA's metrics adapter on 127.0.0.1:%d, APIService %s Available in %s", port, ExternalMetricsAPIService, time.Since(began).Round(100*time.Millisecond))
	return nil
}

// apiServiceAvailable succeeds once the aggregator reports the APIService
// Available (its availability check reached the server behind it).
func (c *ControlPlane) apiServiceAvailable(name string) func(context.Context) error {
	return func(ctx context.Context) error {
		o, err := c.Dynamic.Resource(apiServices).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
		for _, cond := range conds {
			m, _ := cond.(map[string]any)
			if m["type"] == "Available" {
				if m["status"] == "True" {
					return nil
				}
				return fmt.Errorf("APIService %s not Available: %v: %v", name, m["reason"], m["message"])
			}
		}
		return fmt.Errorf("APIService %s has no Available condition yet", name)
	}
}

// procByName returns the process called name; a stand-in that says so
// when there is none.
func (c *ControlPlane) procByName(name string) *process {
	for _, p := range c.procs {
		if p.name == name {
			return p
		}
	}
	return &process{name: name, log: filepath.Join(c.Dir, name+".log")}
}
