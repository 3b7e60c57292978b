package k8s

import (
	"context"
	"fmt"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const lanesNS = "sous-lanes" // the rabbitmq-lanes overlay's namespace

// lanesOverlay is the rabbitmq-lanes overlay as it ships, with a test's
// changes only: fresh lane queues on the shared broker (in the
// ScaledObject's triggers and in SOUS_LANES alike) and the short KEDA
// intervals of testOverlay.
func lanesOverlay(inter, bulk string) map[string]string {
	spec := fmt.Sprintf("interactive=%s,bulk=%s:share=0.2", inter, bulk)
	return map[string]string{"k8stest/lanes/kustomization.yaml": fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy/k8s/overlays/rabbitmq-lanes
patches:
  - target: {group: keda.sh, kind: ScaledObject, name: sous-worker}
    patch: |-
      - {op: replace, path: /spec/pollingInterval, value: %d}
      - {op: replace, path: /spec/cooldownPeriod, value: %d}
      - {op: replace, path: /spec/triggers/0/metadata/queueName, value: %q}
      - {op: replace, path: /spec/triggers/1/metadata/queueName, value: %q}
  - target: {kind: ConfigMap, name: sous-config}
    patch: |-
      - {op: replace, path: /data/SOUS_LANES, value: %q}
      - {op: replace, path: /data/SOUS_GATEWAY_LANES, value: %q}
`, pollingInterval, cooldownPeriod, inter, bulk, spec, spec)}
}

// TestLanesScaleFromZeroOnEitherLane: the rabbitmq-lanes overlay on the
// real apiserver with the real KEDA operator: one ScaledObject with a
// trigger per lane queue wakes the workers for work in either lane alone,
// and takes them back to zero when both are empty.
func TestLanesScaleFromZeroOnEitherLane(t *testing.T) {
	b := NeedKEDA(t)
	needManagementAPI(t)
	ch, inter := testQueue(t)
	_, bulk := testQueue(t)

	cp := Start(t, b, Options{})
	cp.StartKEDA(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	applied, objs := applyOverlay(t, ctx, cp, "k8stest/lanes", lanesOverlay(inter, bulk), lanesNS)
	for _, o := range objs {
		if o.GetKind() != "ScaledObject" {
			continue
		}
		if n := len(o.Object["spec"].(map[string]any)["triggers"].([]any)); n != 2 {
			t.Fatalf("the rendered ScaledObject has %d triggers, want one per lane", n)
		}
	}

	w := watcher{t: t, cp: cp, ns: lanesNS, name: "sous-worker"}
	w.waitScaledObjectReady(ctx)
	w.transition(ctx, "applied, both lanes empty", applied, 0, 60*time.Second)

	for _, lane := range []struct{ name, queue string }{{"bulk", bulk}, {"interactive", inter}} {
		for i := range 3 {
			if err := ch.PublishWithContext(ctx, "", lane.queue, false, false, amqp.Publishing{Body: fmt.Appendf(nil, `{"prompt":"p%d"}`, i)}); err != nil {
				t.Fatal(err)
			}
		}
		w.transition(ctx, "3 messages in the "+lane.name+" lane alone", time.Now(), 1, 60*time.Second)
		if _, err := ch.QueuePurge(lane.queue, false); err != nil {
			t.Fatal(err)
		}
		w.transition(ctx, fmt.Sprintf("the %s lane emptied (cooldown %ds)", lane.name, cooldownPeriod), time.Now(), 0, 90*time.Second)
	}
}
