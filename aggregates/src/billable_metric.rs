//! `BillableMetric`: what a service meters (e.g. `cpu_seconds`, summed over
//! the `cpu_seconds` property of its usage events). Immutable once created.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::refusal::{codes, CatalogError, FieldErrors};
use crate::wire::{identifier, required_string};

/// How a metric folds its events into units (Lago's aggregation types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationType {
    /// Number of events.
    CountAgg,
    /// Sum of the property.
    SumAgg,
    /// Largest value of the property.
    MaxAgg,
    /// Number of distinct values of the property.
    UniqueCountAgg,
    /// Value of the property on the latest event.
    LatestAgg,
    /// Sum of the property weighted by how long each value held.
    WeightedSumAgg,
}

impl AggregationType {
    /// Parse Lago's name; anything else is refused, never defaulted.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "count_agg" => Self::CountAgg,
            "sum_agg" => Self::SumAgg,
            "max_agg" => Self::MaxAgg,
            "unique_count_agg" => Self::UniqueCountAgg,
            "latest_agg" => Self::LatestAgg,
            "weighted_sum_agg" => Self::WeightedSumAgg,
            _ => return None,
        })
    }

    /// Lago's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CountAgg => "count_agg",
            Self::SumAgg => "sum_agg",
            Self::MaxAgg => "max_agg",
            Self::UniqueCountAgg => "unique_count_agg",
            Self::LatestAgg => "latest_agg",
            Self::WeightedSumAgg => "weighted_sum_agg",
        }
    }
}

/// A metric as a client described it (raw; validated by the aggregate).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct MetricInput {
    /// Display name.
    pub name: Option<String>,
    /// Identifier used by usage events.
    pub code: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// One of Lago's aggregation types.
    pub aggregation_type: Option<String>,
    /// The event property aggregated (all but `count_agg`).
    pub field_name: Option<String>,
    /// For `weighted_sum_agg`: `seconds` (the only interval Lago has).
    pub weighted_interval: Option<String>,
    /// Whether units carry over from period to period.
    pub recurring: Option<bool>,
}

/// Commands on a billable metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BillableMetricCommand {
    /// Create the metric with a fresh `lago_id`.
    Create {
        /// The id clients will reference it by.
        lago_id: Uuid,
        /// What the client sent.
        input: MetricInput,
    },
}

/// A validated metric definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricDefinition {
    /// Lago id.
    pub lago_id: Uuid,
    /// Display name.
    pub name: String,
    /// Code.
    pub code: String,
    /// Free text.
    pub description: Option<String>,
    /// Aggregation.
    pub aggregation_type: AggregationType,
    /// Aggregated property.
    pub field_name: Option<String>,
    /// Weighting interval for `weighted_sum_agg`.
    pub weighted_interval: Option<String>,
    /// Units carry over between periods.
    pub recurring: bool,
}

/// Facts about a billable metric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BillableMetricEvent {
    /// The metric was created.
    BillableMetricCreated(MetricDefinition),
}

impl DomainEvent for BillableMetricEvent {
    fn event_type(&self) -> String {
        "BillableMetricCreated".to_string()
    }
    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The write model of a metric (aggregate id `{service}/{code}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BillableMetric {
    definition: Option<MetricDefinition>,
}

impl BillableMetric {
    /// The metric, once created.
    pub fn definition(&self) -> Option<&MetricDefinition> {
        self.definition.as_ref()
    }
}

/// What a plan's charge needs to know of its metric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricRef {
    /// Lago id.
    pub lago_id: Uuid,
    /// Code.
    pub code: String,
    /// Aggregation.
    pub aggregation_type: AggregationType,
}

impl From<&MetricDefinition> for MetricRef {
    fn from(definition: &MetricDefinition) -> Self {
        Self {
            lago_id: definition.lago_id,
            code: definition.code.clone(),
            aggregation_type: definition.aggregation_type,
        }
    }
}

/// Validate a metric as sent.
pub fn validate_metric(
    lago_id: Uuid,
    input: MetricInput,
) -> Result<MetricDefinition, CatalogError> {
    let mut errors = FieldErrors::default();
    let name = required_string(&mut errors, "name", &input.name);
    let code = identifier(&mut errors, "code", &input.code);
    let aggregation_type = match input.aggregation_type.as_deref() {
        None => {
            errors.add("aggregation_type", codes::MANDATORY);
            None
        }
        Some(name) => {
            let parsed = AggregationType::parse(name);
            if parsed.is_none() {
                errors.add("aggregation_type", codes::INVALID);
            }
            parsed
        }
    };
    let field_name = input
        .field_name
        .map(|f| f.trim().to_string())
        .filter(|f| !f.is_empty());
    let needs_field = aggregation_type.is_some_and(|a| a != AggregationType::CountAgg);
    if needs_field && field_name.is_none() {
        errors.add("field_name", codes::MANDATORY);
    }
    let weighted_interval = match (aggregation_type, input.weighted_interval.as_deref()) {
        (Some(AggregationType::WeightedSumAgg), None | Some("seconds")) => Some("seconds".into()),
        (Some(AggregationType::WeightedSumAgg), Some(_)) => {
            errors.add("weighted_interval", codes::INVALID);
            None
        }
        _ => None,
    };
    errors.into_result()?;
    Ok(MetricDefinition {
        lago_id,
        name,
        code,
        description: input.description,
        aggregation_type: aggregation_type.expect("validated"),
        field_name: if needs_field { field_name } else { None },
        weighted_interval,
        recurring: input.recurring.unwrap_or(false),
    })
}

impl Aggregate for BillableMetric {
    const TYPE: &'static str = "BillableMetric";
    type Command = BillableMetricCommand;
    type Event = BillableMetricEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CatalogError> {
        let BillableMetricCommand::Create { lago_id, input } = command;
        if self.definition.is_some() {
            return Err(CatalogError::invalid("code", codes::ALREADY_EXISTS));
        }
        let definition = validate_metric(lago_id, input)?;
        sink.write(BillableMetricEvent::BillableMetricCreated(definition), self)
            .await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        let BillableMetricEvent::BillableMetricCreated(definition) = event;
        self.definition = Some(definition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn input(aggregation: &str, field: Option<&str>) -> MetricInput {
        MetricInput {
            name: Some("CPU seconds".into()),
            code: Some("cpu_seconds".into()),
            aggregation_type: Some(aggregation.into()),
            field_name: field.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn every_lago_aggregation_type_is_accepted() {
        for name in [
            "count_agg",
            "sum_agg",
            "max_agg",
            "unique_count_agg",
            "latest_agg",
            "weighted_sum_agg",
        ] {
            let definition = validate_metric(Uuid::nil(), input(name, Some("value"))).unwrap();
            assert_eq!(definition.aggregation_type.as_str(), name);
        }
    }

    #[test]
    fn an_unknown_aggregation_type_is_refused_by_name() {
        let error = validate_metric(Uuid::nil(), input("avg_agg", Some("x"))).unwrap_err();
        assert_eq!(
            error,
            CatalogError::invalid("aggregation_type", "value_is_invalid")
        );
    }

    #[test]
    fn field_name_is_required_except_for_count() {
        let error = validate_metric(Uuid::nil(), input("sum_agg", None)).unwrap_err();
        assert_eq!(
            error,
            CatalogError::invalid("field_name", "value_is_mandatory")
        );
        let count = validate_metric(Uuid::nil(), input("count_agg", Some("ignored"))).unwrap();
        assert_eq!(count.field_name, None);
    }

    #[test]
    fn a_second_create_with_the_same_code_is_refused() {
        let definition = validate_metric(Uuid::nil(), input("sum_agg", Some("cpu"))).unwrap();
        TestFramework::<BillableMetric>::with(())
            .given(vec![BillableMetricEvent::BillableMetricCreated(definition)])
            .when(BillableMetricCommand::Create {
                lago_id: Uuid::nil(),
                input: input("sum_agg", Some("cpu")),
            })
            .then_expect_error(CatalogError::invalid("code", "value_already_exist"));
    }
}
