package servicebus

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	azlog "github.com/Azure/azure-sdk-for-go/sdk/azcore/log"
	"github.com/Azure/azure-sdk-for-go/sdk/messaging/azservicebus"
)

func TestScratch(t *testing.T) {
	if os.Getenv("SCRATCH") == "" {
		t.Skip()
	}
	azlog.SetListener(func(e azlog.Event, s string) { fmt.Println("AZ", e, s) })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := azservicebus.NewClientFromConnectionString("Endpoint=sb://127.0.0.1:15999;SharedAccessKeyName=x;SharedAccessKey=y;UseDevelopmentEmulator=true", nil)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := c.NewSender("q", nil)
	id := "m1"
	if err := s.SendMessage(ctx, &azservicebus.Message{Body: []byte("hi"), MessageID: &id, ApplicationProperties: map[string]any{"traceparent": "tp"}}, nil); err != nil {
		t.Fatal(err)
	}
	r, _ := c.NewReceiverForQueue("q", nil)
	ms, err := r.ReceiveMessages(ctx, 5, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := ms[0]
	t.Logf("%+v %s lu=%v eq=%v seq=%v", m, m.Body, m.LockedUntil, m.EnqueuedTime, *m.SequenceNumber)
	if err := r.RenewMessageLock(ctx, m, nil); err != nil {
		t.Fatal(err)
	}
	t.Logf("renewed %v", m.LockedUntil)
	if err := r.AbandonMessage(ctx, m, nil); err != nil {
		t.Fatal(err)
	}
	ms, err = r.ReceiveMessages(ctx, 5, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("count %d", ms[0].DeliveryCount)
	reason := "bad"
	if err := r.DeadLetterMessage(ctx, ms[0], &azservicebus.DeadLetterOptions{Reason: &reason, PropertiesToModify: map[string]any{"x": "y"}}); err != nil {
		t.Fatal(err)
	}
	ps, err := r.PeekMessages(ctx, 1, nil)
	t.Logf("peek %v %v", ps, err)
	r.Close(ctx)
	s.Close(ctx)
	c.Close(ctx)
}
