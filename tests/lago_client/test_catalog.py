"""The official lago-python-client, unchanged, against a running ledger.

Run by tests/lago_client/run (from scripts/test): LEDGER_URL points at a
ledger started on a fresh database, LEDGER_ADMIN_KEY is its operator key.
Each test registers its own service through the admin API, so tests do not
see each other's catalog.
"""

import json
import os
import time
import unittest
import urllib.request
import uuid

from lago_python_client.client import Client
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models import (
    BatchEvent,
    BillableMetric,
    Charge,
    Charges,
    Customer,
    CustomerBillingConfiguration,
    Event,
    Invoice,
    Plan,
    Subscription,
    Tax,
    WebhookEndpoint,
)

LEDGER_URL = os.environ["LEDGER_URL"]
ADMIN_KEY = os.environ["LEDGER_ADMIN_KEY"]


def admin_post(path, body):
    request = urllib.request.Request(
        f"{LEDGER_URL}/admin/v1{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def new_service_client():
    code = "svc_" + uuid.uuid4().hex[:12]
    admin_post("/services", {"service": {"code": code, "name": code}})
    key = admin_post(f"/services/{code}/api_keys", {"api_key": {"label": "lago client"}})["api_key"]["key"]
    return Client(api_key=key, api_url=LEDGER_URL)


AGGREGATIONS = ["count_agg", "sum_agg", "max_agg", "unique_count_agg", "latest_agg", "weighted_sum_agg"]


class CatalogThroughTheOfficialClient(unittest.TestCase):
    def setUp(self):
        self.client = new_service_client()

    def create_metric(self, code="cpu_seconds", aggregation="sum_agg"):
        return self.client.billable_metrics.create(
            BillableMetric(name=code, code=code, aggregation_type=aggregation, field_name="value")
        )

    def create_catalog(self):
        metric = self.create_metric()
        self.client.taxes.create(Tax(name="HST Ontario", code="hst_on", rate=13.0))
        plan = self.client.plans.create(
            Plan(
                name="Starter",
                code="starter",
                interval="monthly",
                amount_cents=1900,
                amount_currency="CAD",
                pay_in_advance=False,
                tax_codes=["hst_on"],
                charges=Charges(
                    __root__=[
                        Charge(
                            billable_metric_id=metric.lago_id,
                            charge_model="standard",
                            properties={"amount": "0.0075", "unit_size": "3600", "free_units": "36000"},
                        )
                    ]
                ),
            )
        )
        customer = self.client.customers.create(
            Customer(
                external_id="cus_ada",
                name="Ada",
                email="ada@example.com",
                currency="CAD",
                timezone="America/Toronto",
                tax_codes=["hst_on"],
                billing_configuration=CustomerBillingConfiguration(
                    invoice_grace_period=3, provider_customer_id="cus_stripe_1"
                ),
            )
        )
        return metric, plan, customer

    def test_billable_metrics_of_every_aggregation_type(self):
        for aggregation in AGGREGATIONS:
            created = self.create_metric(code=aggregation, aggregation=aggregation)
            self.assertEqual(created.aggregation_type, aggregation)
        found = self.client.billable_metrics.find("max_agg")
        self.assertEqual(found.code, "max_agg")
        self.assertEqual(found.field_name, "value")
        listed = self.client.billable_metrics.find_all({"per_page": 4, "page": 2})
        self.assertEqual([m.code for m in listed["billable_metrics"]], ["latest_agg", "weighted_sum_agg"])
        self.assertEqual(listed["meta"]["total_count"], 6)
        self.assertEqual(listed["meta"]["prev_page"], 1)

    def test_taxes(self):
        tax = self.client.taxes.create(Tax(name="HST Ontario", code="hst_on", rate=13.0))
        self.assertEqual(tax.rate, 13.0)
        self.assertEqual(self.client.taxes.find("hst_on").name, "HST Ontario")
        self.assertEqual(len(self.client.taxes.find_all()["taxes"]), 1)

    def test_plans_with_every_charge_model(self):
        metric = self.create_metric()

        def charge(model, properties):
            return Charge(billable_metric_id=metric.lago_id, charge_model=model, properties=properties)

        plan = self.client.plans.create(
            Plan(
                name="Every model",
                code="every_model",
                interval="yearly",
                amount_cents=12000,
                amount_currency="USD",
                charges=Charges(
                    __root__=[
                        charge("standard", {"amount": "0.0075"}),
                        charge("package", {"amount": "5", "free_units": 100, "package_size": 1000}),
                        charge(
                            "graduated",
                            {
                                "graduated_ranges": [
                                    {"from_value": 0, "to_value": 10, "per_unit_amount": "1", "flat_amount": "2"},
                                    {"from_value": 11, "to_value": None, "per_unit_amount": "0.5", "flat_amount": "0"},
                                ]
                            },
                        ),
                        charge(
                            "volume",
                            {
                                "volume_ranges": [
                                    {"from_value": 0, "to_value": 100, "per_unit_amount": "2", "flat_amount": "0"},
                                    {"from_value": 101, "to_value": None, "per_unit_amount": "1", "flat_amount": "10"},
                                ]
                            },
                        ),
                        charge("percentage", {"rate": "2.9", "fixed_amount": "0.30"}),
                        charge(
                            "graduated_percentage",
                            {
                                "graduated_percentage_ranges": [
                                    {"from_value": 0, "to_value": 10, "rate": "1", "flat_amount": "200"},
                                    {"from_value": 11, "to_value": None, "rate": "2", "flat_amount": "300"},
                                ]
                            },
                        ),
                    ]
                ),
            )
        )
        models = [c.charge_model for c in plan.charges.__root__]
        self.assertEqual(models, ["standard", "package", "graduated", "volume", "percentage", "graduated_percentage"])
        self.assertEqual(
            plan.charges.__root__[5].properties["graduated_percentage_ranges"][1],
            {"from_value": 11, "to_value": None, "rate": "2", "flat_amount": "300"},
        )
        self.assertEqual(plan.charges.__root__[0].properties["amount"], "0.0075")
        found = self.client.plans.find("every_model")
        self.assertEqual(found.amount_cents, 12000)
        self.assertEqual(found.interval, "yearly")
        updated = self.client.plans.update(Plan(amount_cents=15000), "every_model")
        self.assertEqual(updated.amount_cents, 15000)
        self.assertEqual(len(updated.charges.__root__), 6)
        self.assertEqual(self.client.plans.find_all()["meta"]["total_count"], 1)

    def test_an_unknown_interval_is_a_422_naming_the_field(self):
        with self.assertRaises(LagoApiError) as refused:
            self.client.plans.create(
                Plan(name="x", code="x", interval="biweekly", amount_cents=1, amount_currency="USD")
            )
        self.assertEqual(refused.exception.status_code, 422)
        self.assertEqual(refused.exception.response["error_details"], {"interval": ["value_is_invalid"]})

    def test_customers_upsert_and_list(self):
        _, _, customer = self.create_catalog()
        self.assertEqual(customer.external_id, "cus_ada")
        self.assertEqual(customer.applicable_timezone, "America/Toronto")
        self.assertEqual(customer.billing_configuration.provider_customer_id, "cus_stripe_1")
        updated = self.client.customers.create(Customer(external_id="cus_ada", name="Ada Lovelace"))
        self.assertEqual(updated.name, "Ada Lovelace")
        self.assertEqual(updated.email, "ada@example.com")
        self.assertEqual(updated.lago_id, customer.lago_id)
        self.assertEqual(self.client.customers.find("cus_ada").name, "Ada Lovelace")
        self.assertEqual(len(self.client.customers.find_all()["customers"]), 1)

    def test_subscriptions_create_find_list_and_terminate(self):
        _, plan, customer = self.create_catalog()
        subscription = self.client.subscriptions.create(
            Subscription(external_customer_id="cus_ada", plan_code="starter", external_id="dep_1", name="web")
        )
        self.assertEqual(subscription.status, "active")
        self.assertEqual(subscription.plan_code, "starter")
        self.assertEqual(subscription.lago_customer_id, customer.lago_id)
        again = self.client.subscriptions.create(
            Subscription(external_customer_id="cus_ada", plan_code="starter", external_id="dep_1")
        )
        self.assertEqual(again.lago_id, subscription.lago_id)
        self.assertEqual(self.client.subscriptions.find("dep_1").external_id, "dep_1")
        listed = self.client.subscriptions.find_all({"external_customer_id": "cus_ada"})
        self.assertEqual([s.external_id for s in listed["subscriptions"]], ["dep_1"])
        terminated = self.client.subscriptions.destroy("dep_1")
        self.assertEqual(terminated.status, "terminated")
        with self.assertRaises(LagoApiError) as missing:
            self.client.subscriptions.create(
                Subscription(external_customer_id="cus_ada", plan_code="gold", external_id="dep_2")
            )
        self.assertEqual(missing.exception.status_code, 404)
        self.assertEqual(missing.exception.response["code"], "plan_not_found")

    def subscribe_ten_days_ago(self, external_id="dep_1"):
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 10 * 86400))
        return self.client.subscriptions.create(
            Subscription(
                external_customer_id="cus_ada", plan_code="starter", external_id=external_id, subscription_at=started
            )
        )

    def test_events_create_and_batch_create_count_a_retry_once(self):
        self.create_catalog()
        self.subscribe_ten_days_ago()
        now = int(time.time()) - 60
        event = Event(
            transaction_id="tx_1",
            external_subscription_id="dep_1",
            code="cpu_seconds",
            timestamp=now,
            properties={"value": 99000},
        )
        created = self.client.events.create(event)
        self.assertEqual(created.transaction_id, "tx_1")
        retried = self.client.events.create(event)
        self.assertEqual(retried.lago_id, created.lago_id)
        batch = BatchEvent(
            events=[
                Event(
                    transaction_id=f"tx_b{i}",
                    external_subscription_id="dep_1",
                    code="cpu_seconds",
                    timestamp=now,
                    properties={"value": 99000},
                )
                for i in range(3)
            ]
        )
        self.client.events.batch_create(batch)
        self.client.events.batch_create(batch)  # a retried batch
        with self.assertRaises(LagoApiError) as conflict:
            self.client.events.create(
                Event(
                    transaction_id="tx_1",
                    external_subscription_id="dep_1",
                    code="cpu_seconds",
                    timestamp=now,
                    properties={"value": 1},
                )
            )
        self.assertEqual(conflict.exception.status_code, 422)
        self.assertEqual(conflict.exception.response["error_details"], {"transaction_id": ["value_already_exist"]})
        # 4 events of 99,000 s: 396,000 s, 360,000 over the quota = 100 core-hours = $0.75.
        for _ in range(100):
            usage = self.client.customers.current_usage("cus_ada", "dep_1")
            if usage.charges_usage[0].events_count == 4:
                break
            time.sleep(0.05)
        self.assertEqual(usage.charges_usage[0].events_count, 4)
        self.assertEqual(usage.amount_cents, 75)
        self.assertEqual(usage.taxes_amount_cents, 10)
        self.assertEqual(usage.total_amount_cents, 85)
        self.assertEqual(usage.charges_usage[0].units, "396000")

    def test_a_percentage_charge_bills_what_lago_bills(self):
        # Lago's rule: the first free_units_per_events events are free
        # entirely (rate and fixed fee): (500 - 140) × 2.5% + 2 × $0.05 = $9.10.
        metric = self.create_metric(code="payments")
        self.client.plans.create(
            Plan(
                name="Payments",
                code="payments",
                interval="monthly",
                amount_cents=0,
                amount_currency="USD",
                pay_in_advance=False,
                charges=Charges(
                    __root__=[
                        Charge(
                            billable_metric_id=metric.lago_id,
                            charge_model="percentage",
                            properties={"rate": "2.5", "fixed_amount": "0.05", "free_units_per_events": 2},
                        )
                    ]
                ),
            )
        )
        self.client.customers.create(Customer(external_id="cus_pay", name="Pay", currency="USD"))
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 10 * 86400))
        self.client.subscriptions.create(
            Subscription(external_customer_id="cus_pay", plan_code="payments", external_id="pay_1", subscription_at=started)
        )
        now = int(time.time()) - 600
        self.client.events.batch_create(
            BatchEvent(
                events=[
                    Event(
                        transaction_id=f"pay_{i}",
                        external_subscription_id="pay_1",
                        code="payments",
                        timestamp=now + i,
                        properties={"value": str(value)},
                    )
                    for i, value in enumerate([100, 40, 60, 300])
                ]
            )
        )
        for _ in range(100):
            usage = self.client.customers.current_usage("cus_pay", "pay_1")
            if usage.charges_usage[0].events_count == 4:
                break
            time.sleep(0.05)
        self.assertEqual(usage.charges_usage[0].events_count, 4)
        self.assertEqual(usage.charges_usage[0].units, "500")
        self.assertEqual(usage.amount_cents, 910)
        self.assertEqual(usage.total_amount_cents, 910)

    def test_invoices_find_all_find_and_finalize(self):
        self.create_catalog()
        # A long grace period keeps every closed period a draft.
        self.client.customers.create(
            Customer(
                external_id="cus_ada",
                billing_configuration=CustomerBillingConfiguration(invoice_grace_period=3650),
            )
        )
        # Midnight, September 1st 2026, in Toronto.
        self.client.subscriptions.create(
            Subscription(
                external_customer_id="cus_ada",
                plan_code="starter",
                external_id="dep_1",
                subscription_at="2026-09-01T04:00:00Z",
            )
        )
        september = {"external_customer_id": "cus_ada", "issuing_date_from": "2026-10-01",
                     "issuing_date_to": "2026-10-01"}
        deadline = time.time() + 30
        while not self.client.invoices.find_all(september)["invoices"] and time.time() < deadline:
            time.sleep(0.2)
        drafts = self.client.invoices.find_all(september)["invoices"]
        self.assertEqual(len(drafts), 1, "the period closer drafted September's invoice")
        draft = drafts[0]
        self.assertEqual((draft.status, draft.invoice_type, draft.currency), ("draft", "subscription", "CAD"))
        self.assertEqual(draft.billing_periods.__root__[0].invoicing_reason, "subscription_periodic")
        finalized = self.client.invoices.finalize(draft.lago_id)
        self.assertEqual(finalized.status, "finalized")
        self.assertTrue(finalized.number.endswith("-000001"))
        # $19.00 for all of September, HST 13%: 247 cents.
        self.assertEqual(
            (finalized.fees_amount_cents, finalized.taxes_amount_cents, finalized.total_amount_cents),
            (1900, 247, 2147),
        )
        fees = finalized.fees.__root__
        self.assertEqual([(f.item.type, f.amount_cents) for f in fees], [("subscription", 1900), ("charge", 0)])
        found = self.client.invoices.find(draft.lago_id)
        self.assertEqual((found.status, found.number), ("finalized", finalized.number))
        listed = self.client.invoices.find_all({"status": "finalized"})
        self.assertEqual([i.lago_id for i in listed["invoices"]], [draft.lago_id])
        with self.assertRaises(LagoApiError) as again:
            self.client.invoices.finalize(draft.lago_id)
        self.assertEqual(again.exception.status_code, 405)
        # Paid elsewhere: Lago's update sets the payment status.
        self.assertEqual(finalized.payment_status, "pending")
        paid = self.client.invoices.update(Invoice(payment_status="succeeded"), draft.lago_id)
        self.assertEqual((paid.payment_status, paid.payment_overdue), ("succeeded", False))
        self.assertEqual(
            [i.lago_id for i in self.client.invoices.find_all({"payment_status": "succeeded"})["invoices"]],
            [draft.lago_id],
        )

    def test_webhook_endpoints_create_find_update_list_and_destroy(self):
        # A literal public address: nothing to resolve, nothing private.
        created = self.client.webhook_endpoints.create(
            WebhookEndpoint(webhook_url="https://93.184.215.14/ledger", signature_algo="hmac")
        )
        self.assertEqual((created.webhook_url, created.signature_algo), ("https://93.184.215.14/ledger", "hmac"))
        found = self.client.webhook_endpoints.find(created.lago_id)
        self.assertEqual(found.lago_id, created.lago_id)
        updated = self.client.webhook_endpoints.update(
            WebhookEndpoint(event_types=["invoice.created", "invoice.payment_failure"]), created.lago_id
        )
        self.assertEqual(updated.event_types, ["invoice.created", "invoice.payment_failure"])
        self.assertEqual(updated.webhook_url, "https://93.184.215.14/ledger")
        listed = self.client.webhook_endpoints.find_all()
        self.assertEqual([e.lago_id for e in listed["webhook_endpoints"]], [created.lago_id])
        with self.assertRaises(LagoApiError) as refused:
            self.client.webhook_endpoints.create(WebhookEndpoint(webhook_url="http://169.254.169.254/"))
        self.assertEqual(refused.exception.status_code, 422)
        self.client.webhook_endpoints.destroy(created.lago_id)
        with self.assertRaises(LagoApiError) as gone:
            self.client.webhook_endpoints.find(created.lago_id)
        self.assertEqual(gone.exception.status_code, 404)

    def test_another_services_key_finds_nothing(self):
        self.create_catalog()
        other = new_service_client()
        with self.assertRaises(LagoApiError) as hidden:
            other.customers.find("cus_ada")
        self.assertEqual(hidden.exception.status_code, 404)
        self.assertEqual(other.plans.find_all()["meta"]["total_count"], 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
