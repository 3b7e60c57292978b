// Package queue defines what sous needs from a message broker: deliveries that
// carry a request, outgoing messages that carry a result, and the three ways a
// delivery is settled (ack, requeue, dead-letter with a reason).
//
// Drivers live in sub-packages (rabbitmq, servicebus) and translate their
// broker's model into these types. Every driver passes the contract suite in
// queuetest.
//
// Concurrency: the types here are plain values. A Delivery is owned by one
// goroutine at a time and must be settled exactly once; drivers document their
// own concurrency contracts.
package queue
