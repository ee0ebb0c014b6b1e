#!/usr/bin/env python3
"""NexaCloud's side of the control loop: a webhook receiver for the ledger.

It verifies every delivery with the official `standardwebhooks` library
(the endpoint's secret, `whsec_...`), de-duplicates on `webhook-id` (the
ledger delivers at least once), and acts on three signals by calling
NexaCloud's own API:

    invoice.payment_failure                        -> POST /subscriptions/{deployment}/suspend
    invoice.payment_status_updated (succeeded)     -> POST /subscriptions/{deployment}/restore
    subscription.terminated                        -> POST /subscriptions/{deployment}/deprovision

The deployment is the subscription's `metadata.deployment_id` (the
subscription's external id when there is none).

    LEDGER_WEBHOOK_SECRET=whsec_... NEXACLOUD_API=http://127.0.0.1:9000 \
        python3 examples/nexacloud_receiver.py --port 8787

Each action is printed as one JSON line on stdout.
"""

import argparse
import json
import os
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


def deployment_of(subscription):
    metadata = subscription.get("metadata") or {}
    return metadata.get("deployment_id") or subscription.get("external_id")


def actions(event):
    """The (action, deployment) pairs one verified delivery asks for."""
    webhook_type = event.get("webhook_type")
    if webhook_type == "invoice.payment_failure":
        invoice = event["payment_provider_invoice_payment_error"]["invoice"]
        return [("suspend", deployment_of(s)) for s in invoice.get("subscriptions", [])]
    if webhook_type == "invoice.payment_status_updated":
        invoice = event["invoice"]
        if invoice.get("payment_status") == "succeeded":
            return [("restore", deployment_of(s)) for s in invoice.get("subscriptions", [])]
        return []
    if webhook_type == "subscription.terminated":
        return [("deprovision", deployment_of(event["subscription"]))]
    return []


class Receiver(BaseHTTPRequestHandler):
    webhook = None
    api = None
    seen = set()
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            event = self.webhook.verify(body, headers)
        except WebhookVerificationError as error:
            print(json.dumps({"refused": str(error)}), flush=True)
            return self.answer(400, {"error": "invalid signature"})
        message_id = headers["webhook-id"]
        with self.lock:
            if message_id in self.seen:
                return self.answer(200, {"duplicate": message_id})
            self.seen.add(message_id)
        for action, deployment in actions(event):
            request = urllib.request.Request(
                f"{self.api}/subscriptions/{deployment}/{action}", data=b"{}", method="POST",
                headers={"content-type": "application/json", "x-webhook-id": message_id},
            )
            urllib.request.urlopen(request, timeout=10).read()
            print(json.dumps({"action": action, "deployment": deployment,
                              "webhook_type": event["webhook_type"], "webhook_id": message_id}),
                  flush=True)
        return self.answer(200, {"received": message_id})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--secret", default=os.environ.get("LEDGER_WEBHOOK_SECRET"))
    parser.add_argument("--api", default=os.environ.get("NEXACLOUD_API", "http://127.0.0.1:9000"))
    args = parser.parse_args()
    if not args.secret:
        sys.exit("the endpoint secret is needed: --secret or LEDGER_WEBHOOK_SECRET")
    Receiver.webhook = Webhook(args.secret)
    Receiver.api = args.api.rstrip("/")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Receiver)
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
